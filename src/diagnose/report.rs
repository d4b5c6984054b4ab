//! The printed report: one step a line, PASS, FAIL or SKIP, with the cause and every fix.

use std::fmt;

/// The outcome of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
            Self::Skip => "SKIP",
        })
    }
}

/// One printed step: a status line, and on failure the cause and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: &'static str,
    pub status: Status,
    pub summary: String,
    pub cause: Option<String>,
    /// What to do, one line each (a checklist has several).
    pub fix: Vec<String>,
}

impl Step {
    pub fn pass(name: &'static str, summary: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Pass,
            summary: summary.into(),
            cause: None,
            fix: Vec::new(),
        }
    }

    pub fn skip(name: &'static str, summary: impl Into<String>) -> Self {
        Self {
            status: Status::Skip,
            ..Self::pass(name, summary)
        }
    }

    pub fn fail(
        name: &'static str,
        summary: impl Into<String>,
        cause: impl Into<String>,
        fix: Vec<String>,
    ) -> Self {
        Self {
            name,
            status: Status::Fail,
            summary: summary.into(),
            cause: Some(cause.into()),
            fix,
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:<9} {}", self.status, self.name, self.summary)?;
        if let Some(cause) = &self.cause {
            write!(f, "\n     cause: {cause}")?;
        }
        let mut fixes = self.fix.iter();
        if let Some(first) = fixes.next() {
            write!(f, "\n     fix:   {first}")?;
        }
        for more in fixes {
            write!(f, "\n            {more}")?;
        }
        Ok(())
    }
}

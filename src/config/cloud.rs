//! `mailRelay.cloud`: the Microsoft cloud the tenant lives in. One setting sets the login, Graph
//! and SMTP hosts and the scopes together (EXCHANGE.md section 8); explicit endpoint settings
//! still win.

/// A Microsoft 365 cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Cloud {
    #[default]
    Global,
    /// US Government GCC High.
    UsGovHigh,
    /// US Government DoD.
    UsGovDod,
    /// China, operated by 21Vianet.
    China,
}

impl Cloud {
    /// Every spelling `mailRelay.cloud` accepts, any case.
    pub const CHOICES: &[(&str, Cloud)] = &[
        ("global", Cloud::Global),
        ("usGovHigh", Cloud::UsGovHigh),
        ("usGovDoD", Cloud::UsGovDod),
        ("china", Cloud::China),
    ];

    /// The spelling `check-config` prints.
    pub fn name(self) -> &'static str {
        super::read::name_in(Self::CHOICES, &self)
    }

    fn login_host(self) -> &'static str {
        match self {
            Self::Global => "login.microsoftonline.com",
            Self::UsGovHigh | Self::UsGovDod => "login.microsoftonline.us",
            Self::China => "login.chinacloudapi.cn",
        }
    }

    fn graph_host(self) -> &'static str {
        match self {
            Self::Global => "graph.microsoft.com",
            Self::UsGovHigh => "graph.microsoft.us",
            Self::UsGovDod => "dod-graph.microsoft.us",
            Self::China => "microsoftgraph.chinacloudapi.cn",
        }
    }

    /// The SMTP submission host (`smtpServer`'s default when `mailRelay.cloud` is set).
    pub fn smtp_host(self) -> &'static str {
        match self {
            Self::Global => "smtp.office365.com",
            Self::UsGovHigh | Self::UsGovDod => "smtp.office365.us",
            Self::China => "smtp.partner.outlook.cn",
        }
    }

    /// `oAuthTokenEndpoint`'s default, with the `#TenantID#` placeholder.
    pub fn token_endpoint(self) -> String {
        format!("https://{}/#TenantID#/oauth2/v2.0/token", self.login_host())
    }

    /// `oAuthScopes`' default: Exchange Online's resource in this cloud (it follows the SMTP
    /// host, as EXCHANGE.md says).
    pub fn smtp_scope(self) -> &'static str {
        match self {
            Self::Global => "https://outlook.office365.com/.default",
            Self::UsGovHigh | Self::UsGovDod => "https://outlook.office365.us/.default",
            Self::China => "https://partner.outlook.cn/.default",
        }
    }

    /// `mailRelay.graph.baseUrl`'s default.
    pub fn graph_url(self) -> String {
        format!("https://{}/v1.0/", self.graph_host())
    }

    /// `mailRelay.graph.scopes`' default.
    pub fn graph_scope(self) -> String {
        format!("https://{}/.default", self.graph_host())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cloud_has_its_own_hosts_and_global_is_the_old_default() {
        assert_eq!(
            Cloud::Global.token_endpoint(),
            "https://login.microsoftonline.com/#TenantID#/oauth2/v2.0/token"
        );
        assert_eq!(
            Cloud::Global.smtp_scope(),
            "https://outlook.office365.com/.default"
        );
        assert_eq!(
            Cloud::Global.graph_url(),
            "https://graph.microsoft.com/v1.0/"
        );
        assert_eq!(
            Cloud::Global.graph_scope(),
            "https://graph.microsoft.com/.default"
        );
        assert_eq!(
            Cloud::UsGovDod.graph_scope(),
            "https://dod-graph.microsoft.us/.default"
        );
        assert_eq!(
            Cloud::China.token_endpoint(),
            "https://login.chinacloudapi.cn/#TenantID#/oauth2/v2.0/token"
        );
        for (name, cloud) in Cloud::CHOICES {
            assert_eq!(cloud.name(), *name);
        }
    }
}

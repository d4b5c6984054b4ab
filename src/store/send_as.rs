//! The send-as denial memory in SQL: a SendAsDenied seen by one replica spares the others the
//! upload of the same refused mail.

use std::sync::Arc;

use async_trait::async_trait;

use super::db::to_sql;
use super::{Shared, sql};
use crate::clock::Millis;
use crate::send_as::DenialMemory;

pub struct SqlDenials {
    shared: Arc<Shared>,
}

impl SqlDenials {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[async_trait]
impl DenialMemory for SqlDenials {
    async fn remember(&self, address: &str, at: Millis) -> Result<(), String> {
        sql!(self.shared, |pool| sqlx::query(
            "INSERT INTO send_as_denials (address, denied_at) VALUES ($1, $2) \
             ON CONFLICT (address) DO UPDATE SET denied_at = excluded.denied_at"
        )
        .bind(address)
        .bind(to_sql(at))
        .execute(pool)
        .await
        .map(|_| ()))
        .await
    }

    async fn denied_since(&self, address: &str, since: Millis) -> Result<bool, String> {
        let found: Option<i64> = sql!(self.shared, |pool| sqlx::query_scalar(
            "SELECT denied_at FROM send_as_denials WHERE address = $1 AND denied_at >= $2"
        )
        .bind(address)
        .bind(to_sql(since))
        .fetch_optional(pool)
        .await)
        .await?;
        Ok(found.is_some())
    }
}

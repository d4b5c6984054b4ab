//! The test PostgreSQL (`tests/store/start.sh`) as the relay's store settings, read from its
//! `store.env`: its scratch database, which tests share (each uses keys of its own).

use std::path::PathBuf;
use std::time::Duration;

use mail_relay::config::{StoreSettings, StoreUrl};
use secrecy::SecretString;

/// The test PostgreSQL's scratch database, from `store.env`.
pub fn postgres() -> Option<StoreSettings> {
    let dir = std::env::var_os("MAIL_RELAY_STORE_DIR")
        .map_or_else(|| PathBuf::from("/tmp/mail-relay-store"), PathBuf::from);
    let env = std::fs::read_to_string(dir.join("store.env")).ok()?;
    let value = |name: &str| {
        env.lines()
            .find_map(|line| line.strip_prefix(&format!("{name}=")))
            .map(str::to_owned)
    };
    let url = value("MAIL_RELAY_STORE_SQLTEST_URL")?;
    let port: u16 = value("MAIL_RELAY_STORE_PORT")?.parse().ok()?;
    std::net::TcpStream::connect_timeout(
        &([127, 0, 0, 1], port).into(),
        Duration::from_millis(500),
    )
    .ok()?;
    Some(StoreSettings {
        url: StoreUrl::Postgres(url.parse().ok()?),
        password: value("MAIL_RELAY_STORE_PASSWORD").map(SecretString::from),
        ..StoreSettings::default()
    })
}

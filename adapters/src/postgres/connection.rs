//! Connections: the settings concord adds to a connection string (TCP keepalives,
//! `tcp_user_timeout`, a connect timeout) unless it sets them, a connect bounded as a whole,
//! the checks made before a pool opens (`max_prepared_transactions`, the schema), and where the
//! server is, for messages — `host:port/dbname as user`, never the password.
//!
//! # Implementation caveats
//!
//! * Whether a connection string sets a TCP option is read from the string itself (a
//!   `key=value` or URL query parameter of that name); a value quoted to contain such a name
//!   would be mistaken for it, and the default not applied.

use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::Client;

use super::tls::{self, PgTls};
use super::{PostgresConfig, Result, db_error, db_text, redact_url, schema, schema_error};
use crate::ResourceError;

/// TCP keepalives, unless the connection string sets them: a peer silent this long is probed
/// (`keepalives_idle`) …
const KEEPALIVES_IDLE_S: u64 = 10;

/// … every this many seconds (`keepalives_interval`) …
const KEEPALIVES_INTERVAL_S: u64 = 5;

/// … and given up after this many unanswered probes (`keepalives_retries`).
const KEEPALIVES_RETRIES: u32 = 3;

/// How long sent data may stay unacknowledged before the kernel closes the connection
/// (`tcp_user_timeout`), unless the connection string sets it.
const TCP_USER_TIMEOUT_MS: u64 = 30_000;

/// Opens one connection outside a pool (for install, replicate and fence).
pub(super) async fn connect(name: &str, url: &str) -> Result<(Client, String)> {
    let (pg, tls) = pg_config(name, url, PostgresConfig::new(url, 0).connect_timeout_ms)?;
    let target = target_of(&pg);
    Ok((connect_to(name, &pg, &tls, &target).await?, target))
}

/// Connects, the whole handshake bounded by the connect timeout: tokio-postgres bounds only the
/// TCP connect with it, and a server that accepts but never answers the startup would otherwise
/// hold the caller for good.
pub(super) async fn connect_to(
    name: &str,
    pg: &tokio_postgres::Config,
    tls: &PgTls,
    target: &str,
) -> Result<Client> {
    let deadline = pg
        .get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(10));
    let connecting = tokio::time::timeout(deadline, pg.connect(tls.clone()))
        .await
        .map_err(|_| ResourceError::Unavailable {
            resource: name.to_string(),
            message: format!(
                "cannot connect to {target}: no answer to the connection handshake within {} ms",
                deadline.as_millis()
            ),
        })?;
    let (client, connection) = connecting.map_err(|e| ResourceError::Unavailable {
        resource: name.to_string(),
        message: format!("cannot connect to {target}: {}", db_text(&e)),
    })?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Before the pool opens, on a connection of its own: `max_prepared_transactions` above 0 and
/// the schema at this program's version, each refused with its fix.
pub(super) async fn check_server(
    name: &str,
    pg: &tokio_postgres::Config,
    tls: &PgTls,
    target: &str,
) -> Result<()> {
    let client = connect_to(name, pg, tls, target).await?;
    let max: String = client
        .query_one("SHOW max_prepared_transactions", &[])
        .await
        .map_err(|e| db_error(name, target, "read max_prepared_transactions", &e))?
        .get(0);
    if max.trim() == "0" {
        return Err(ResourceError::rejected(
            name,
            format!(
                "{target} has max_prepared_transactions = 0, so it cannot prepare transactions: set max_prepared_transactions (at least the number of concurrent transactions, e.g. 100) in postgresql.conf and restart the server"
            ),
        ));
    }
    schema::check(&client, name)
        .await
        .map_err(|e| schema_error(name, target, e))
}

/// The connection settings of `url`, with concord's defaults for what it leaves unset: TCP
/// keepalives ([`KEEPALIVES_IDLE_S`] and the next two), [`TCP_USER_TIMEOUT_MS`] and a connect
/// timeout of `connect_timeout_ms`, so that a dead server or network is noticed; and its TLS
/// connector (`sslmode`, `sslrootcert`: [`tls`]).
pub(super) fn pg_config(
    name: &str,
    url: &str,
    connect_timeout_ms: u64,
) -> Result<(tokio_postgres::Config, PgTls)> {
    let refused = |e: String| {
        ResourceError::rejected(
            name,
            format!(
                "the connection string {} is invalid: {e}; fix it in the configuration",
                redact_url(url)
            ),
        )
    };
    let (driver_url, settings) = tls::split(url).map_err(refused)?;
    let tls = PgTls::new(settings).map_err(|e| ResourceError::rejected(name, e))?;
    let url = driver_url.as_str();
    let mut pg = tokio_postgres::Config::from_str(url).map_err(|e| {
        ResourceError::rejected(
            name,
            format!(
                "the connection string {} is invalid: {}; fix it in the configuration",
                redact_url(url),
                parse_error_text(&e)
            ),
        )
    })?;
    if !url_sets(url, "keepalives") {
        pg.keepalives(true);
    }
    if !url_sets(url, "keepalives_idle") {
        pg.keepalives_idle(Duration::from_secs(KEEPALIVES_IDLE_S));
    }
    if !url_sets(url, "keepalives_interval") {
        pg.keepalives_interval(Duration::from_secs(KEEPALIVES_INTERVAL_S));
    }
    if !url_sets(url, "keepalives_retries") {
        pg.keepalives_retries(KEEPALIVES_RETRIES);
    }
    if !url_sets(url, "tcp_user_timeout") {
        pg.tcp_user_timeout(Duration::from_millis(TCP_USER_TIMEOUT_MS));
    }
    if !url_sets(url, "connect_timeout") {
        pg.connect_timeout(Duration::from_millis(connect_timeout_ms.max(1)));
    }
    Ok((pg, tls))
}

/// The parser's complaint about a connection string, without the character it quotes (which
/// may be one of a password's): its option names and byte offsets only.
pub(super) fn parse_error_text(e: &tokio_postgres::Error) -> String {
    let text = db_text(e);
    match text.find(" but got ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// Whether the connection string `url` (`key=value …` or a `postgres://…?key=value&…` URL)
/// sets `key`.
pub(super) fn url_sets(url: &str, key: &str) -> bool {
    let params = match url.split_once("://") {
        Some((_, rest)) => rest.split_once('?').map_or("", |(_, query)| query),
        None => url,
    };
    params
        .split(|c: char| c == '&' || c.is_whitespace())
        .any(|param| param.split('=').next().map(str::trim) == Some(key))
}

/// `host:port/dbname as user` — never the password.
pub(super) fn target_of(pg: &tokio_postgres::Config) -> String {
    let host = pg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres {host}:{port}/{} as {}",
        pg.get_dbname().unwrap_or("(default database)"),
        pg.get_user().unwrap_or("(default user)")
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn tcp_defaults_apply_unless_the_connection_string_sets_them() {
        let (pg, _) = pg_config("pg", "host=h user=u dbname=d", 7_000).unwrap();
        assert!(pg.get_keepalives());
        assert_eq!(
            pg.get_keepalives_idle(),
            Duration::from_secs(KEEPALIVES_IDLE_S)
        );
        assert_eq!(
            pg.get_keepalives_interval(),
            Some(Duration::from_secs(KEEPALIVES_INTERVAL_S))
        );
        assert_eq!(pg.get_keepalives_retries(), Some(KEEPALIVES_RETRIES));
        assert_eq!(
            pg.get_tcp_user_timeout(),
            Some(&Duration::from_millis(TCP_USER_TIMEOUT_MS))
        );
        assert_eq!(pg.get_connect_timeout(), Some(&Duration::from_secs(7)));

        let set = "host=h keepalives_idle=60 keepalives_retries = 9 connect_timeout=2";
        let (pg, _) = pg_config("pg", set, 7_000).unwrap();
        assert_eq!(pg.get_keepalives_idle(), Duration::from_secs(60));
        assert_eq!(pg.get_keepalives_retries(), Some(9));
        assert_eq!(pg.get_connect_timeout(), Some(&Duration::from_secs(2)));
        assert_eq!(
            pg.get_keepalives_interval(),
            Some(Duration::from_secs(KEEPALIVES_INTERVAL_S))
        );

        // The driver reads `tcp_user_timeout` in seconds (libpq: milliseconds).
        let url = "postgresql://u@h/d?keepalives=0&tcp_user_timeout=5";
        let (pg, _) = pg_config("pg", url, 7_000).unwrap();
        assert!(!pg.get_keepalives());
        assert_eq!(pg.get_tcp_user_timeout(), Some(&Duration::from_secs(5)));
        assert_eq!(pg.get_connect_timeout(), Some(&Duration::from_secs(7)));
    }

    #[test]
    fn url_sets_reads_keys_not_values() {
        assert!(url_sets("host=h keepalives=1", "keepalives"));
        assert!(!url_sets("host=h keepalives_idle=1", "keepalives"));
        assert!(!url_sets("host=keepalives", "keepalives"));
        assert!(url_sets(
            "postgres://h/d?a=1&keepalives_idle=3",
            "keepalives_idle"
        ));
        assert!(!url_sets(
            "postgres://keepalives_idle@h/d",
            "keepalives_idle"
        ));
    }
}

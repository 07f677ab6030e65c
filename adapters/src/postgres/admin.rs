//! Setting a database up and looking at it from outside a resource: [`install`] the concord
//! schema (`concord pg install`), [`replicate`] tables (`concord pg replicate`: the capture
//! trigger and the trigger refusing `TRUNCATE`), list the prepared branches of a resource
//! without opening it ([`prepared_in`], for `concord txn list`), and [`check_reachable`] (for
//! `concord config check`). Each runs on one connection of its own, outside any pool.
//!
//! # Implementation caveats
//!
//! * None of these fences or takes the session lock: they are administration, run beside a
//!   live resource, and change nothing a branch relies on except by installing the schema.

use tokio_postgres::Row;

use super::connection::{check_server, connect, pg_config, target_of};
use super::{PreparedBranch, Result, check_name, db_error, quote_literal, schema, schema_error};
use crate::{ResourceError, Xid};

/// Sets up (or upgrades) the `concord` schema in the database at `url`; idempotent.
pub async fn install(name: &str, url: &str) -> Result<schema::Installed> {
    let (mut client, target) = connect(name, url).await?;
    schema::install(&mut client)
        .await
        .map_err(|e| schema_error(name, &target, e))
}

/// Installs the capture trigger on each of `tables` (`schema.table` or `table`), so that their
/// changed rows travel in the redo, and the trigger that refuses a `TRUNCATE` of them (which
/// has no row images to replay); a table without a primary key is refused. Idempotent.
pub async fn replicate(name: &str, url: &str, tables: &[String]) -> Result<Vec<String>> {
    let (mut client, target) = connect(name, url).await?;
    schema::check(&client, name)
        .await
        .map_err(|e| schema_error(name, &target, e))?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| db_error(name, &target, "begin", &e))?;
    let mut done = Vec::new();
    for table in tables {
        let found = tx
            .query_opt(
                "SELECT c.oid::regclass::text, format('%I.%I', n.nspname, c.relname)
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')",
                &[table],
            )
            .await
            .map_err(|e| db_error(name, &target, &format!("look up table {table:?}"), &e))?;
        let Some(found) = found else {
            return Err(ResourceError::rejected(
                name,
                format!("table {table:?} does not exist (or is not a table) in {target}"),
            ));
        };
        let (regclass, qualified): (String, String) = (found.get(0), found.get(1));
        let pk: Vec<String> = tx
            .query(
                "SELECT a.attname::text FROM pg_index i
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                 WHERE i.indrelid = $1::text::regclass AND i.indisprimary
                 ORDER BY array_position(i.indkey::int2[], a.attnum)",
                &[&regclass],
            )
            .await
            .map_err(|e| {
                db_error(
                    name,
                    &target,
                    &format!("read the primary key of {qualified}"),
                    &e,
                )
            })?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if pk.is_empty() {
            return Err(ResourceError::rejected(
                name,
                format!(
                    "table {qualified} has no primary key: concord replays rows by primary key; add one (ALTER TABLE {qualified} ADD PRIMARY KEY (…)) and run replicate again"
                ),
            ));
        }
        // Already set up with this key: no DDL (which would wait for every transaction that
        // holds a lock on the table, prepared ones included).
        let current = tx
            .query_opt(
                "SELECT r.pk_cols FROM concord.replicated r
                 WHERE r.tbl = $1 AND 2 = (SELECT count(*) FROM pg_trigger t
                     WHERE t.tgrelid = $2::text::regclass
                       AND t.tgname IN ('concord_capture', 'concord_truncate'))",
                &[&qualified, &regclass],
            )
            .await
            .map_err(|e| db_error(name, &target, &format!("look up {qualified}"), &e))?;
        if current.is_some_and(|r| r.get::<_, Vec<String>>(0) == pk) {
            done.push(qualified);
            continue;
        }
        let args = pk
            .iter()
            .map(|c| quote_literal(c))
            .collect::<Vec<_>>()
            .join(", ");
        tx.batch_execute(&format!(
            "CREATE OR REPLACE TRIGGER concord_capture AFTER INSERT OR UPDATE OR DELETE ON {qualified}
             FOR EACH ROW EXECUTE FUNCTION concord.capture_row({args});
             CREATE OR REPLACE TRIGGER concord_truncate BEFORE TRUNCATE ON {qualified}
             FOR EACH STATEMENT EXECUTE FUNCTION concord.refuse_truncate()"
        ))
        .await
        .map_err(|e| {
            db_error(name, &target, &format!("install the capture trigger on {qualified}"), &e)
        })?;
        tx.execute(
            "INSERT INTO concord.replicated (tbl, pk_cols) VALUES ($1, $2)
             ON CONFLICT (tbl) DO UPDATE SET pk_cols = excluded.pk_cols, at = now()",
            &[&qualified, &pk],
        )
        .await
        .map_err(|e| {
            db_error(
                name,
                &target,
                &format!("record {qualified} as replicated"),
                &e,
            )
        })?;
        done.push(qualified);
    }
    tx.commit()
        .await
        .map_err(|e| db_error(name, &target, "commit", &e))?;
    Ok(done)
}

/// The prepared branches of resource `name` and node `node` in the database at `url`, read over
/// one connection without opening the resource (for `concord txn list`, beside the running
/// application).
pub async fn prepared_in(name: &str, url: &str, node: u32) -> Result<Vec<PreparedBranch>> {
    let (client, target) = connect(name, url).await?;
    let rows = client
        .query(PREPARED_SQL, &[])
        .await
        .map_err(|e| db_error(name, &target, "list prepared transactions", &e))?;
    Ok(prepared_of(name, node, &rows))
}

/// Whether the database of resource `name` at `url` can be used, changing nothing: connects
/// once (bounded by `connect_timeout_ms` unless the connection string sets `connect_timeout`)
/// and checks what [`PostgresResource::open`](super::PostgresResource::open) checks — `max_prepared_transactions` above 0 and
/// the concord schema at this program's version — without installing anything (for `concord
/// config check`). Returns where the server is (never the password).
pub async fn check_reachable(name: &str, url: &str, connect_timeout_ms: u64) -> Result<String> {
    check_name(name)?;
    let (pg, tls) = pg_config(name, url, connect_timeout_ms)?;
    let target = target_of(&pg);
    check_server(name, &pg, &tls, &target).await?;
    Ok(target)
}

pub(super) const PREPARED_SQL: &str =
    "SELECT gid, extract(epoch FROM now() - prepared)::float8 FROM pg_prepared_xacts
     WHERE database = current_database() AND gid LIKE 'concord:%'";

/// The rows of [`PREPARED_SQL`] that are branches of resource `name` and node `node`.
pub(super) fn prepared_of(name: &str, node: u32, rows: &[Row]) -> Vec<PreparedBranch> {
    let suffix = format!(":{name}");
    let mut out = Vec::new();
    for row in rows {
        let gid: String = row.get(0);
        let Some(xid) = gid
            .strip_prefix("concord:")
            .and_then(|rest| rest.strip_suffix(&suffix))
            .and_then(|x| x.parse::<Xid>().ok())
        else {
            continue;
        };
        if xid.node != node {
            continue;
        }
        out.push(PreparedBranch {
            xid,
            gid,
            age_s: row.get(1),
        });
    }
    out.sort_by_key(|b| b.xid);
    out
}

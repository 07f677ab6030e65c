//! The `concord` schema in a PostgreSQL database: what `concord pg install` creates and what the
//! resource checks when it opens.
//!
//! Versioned: `concord.meta` holds `schema_version`. [`install`] creates a missing schema and
//! upgrades an older one step by step, in one transaction, under an advisory lock (two installs
//! at once do not race); it is idempotent. [`check`] refuses a missing, older or newer schema
//! with the command that fixes it.
//!
//! Objects (version 1):
//!
//! * `concord.meta(key, value)` — `schema_version`.
//! * `concord.fence(id = 1, epoch)` — the fence epoch. Every branch takes a transaction-level
//!   advisory lock (the pair 1668247139, 1717923427) in *shared* mode before it reads the epoch at
//!   prepare, so the lock is held by the prepared transaction until it is resolved, and
//!   `fence()` takes the same lock *exclusively* before raising the epoch, so it waits for every
//!   such branch; see `docs/postgres.md`. (An advisory lock rather than `FOR SHARE` on the row:
//!   many concurrent share locks on one row make PostgreSQL create a multixact per prepare.)
//! * `concord.markers(gid, xid, node, at)` — one row per branch, written inside the branch: it
//!   commits with the branch and vanishes with it on rollback, so after the fact a branch whose
//!   prepared transaction is gone is known committed exactly when its marker exists.
//! * `concord.applied(resource, lsn)` — the LSN of the last redo replayed into this database.
//! * `concord.capture(id, txid, tbl, op, pk, row)` — row images written by the capture trigger
//!   in the changing transaction, read and deleted by that same transaction at prepare (so no
//!   other transaction ever sees them).
//! * `concord.replicated(tbl, pk_cols, at)` — the tables `concord pg replicate` set up.
//! * `concord.check_fence(epoch)`; `concord.prepare_branch(epoch, gid, xid, node)` — all of a
//!   prepare but the `PREPARE TRANSACTION` itself: refuses a branch that wrote nothing (SQLSTATE
//!   `CF002`, so the caller votes read-only) or a fenced epoch (`CF001`), reads and deletes the
//!   captured rows and returns them as a JSON array, and writes the marker;
//!   `concord.capture_row()` (the trigger function; it does nothing while `concord.replaying`
//!   is `on`, so replay is not captured again) and `concord.apply_row(tbl, op, pk, row)` (replay
//!   of one row image by primary key).
//!
//! A function a later version replaces is written out only in the newest step that defines it
//! (the step of version 1 holds the tables and `check_fence`): [`install`] always runs the
//! steps up to [`SCHEMA_VERSION`], so an earlier body would be replaced in the same transaction.
//!
//! Version 2 makes capture cheap and adds one-phase commit:
//!
//! * `concord.capture_row()` collects each row image (as the JSON text `[table, op, pk, row]`)
//!   in the transaction-local setting `concord.redo` — no table write, no WAL, nothing to vacuum
//!   — until that holds 64 KiB; further images go to `concord.capture`, and
//!   `concord.spilled = on` says so. A rolled-back savepoint takes its images with it either way.
//! * `concord.take_rows()` takes both out, in capture order; `prepare_branch` uses it.
//! * `concord.finish_branch(gid, xid, node)` is a prepare without the `PREPARE`, for a branch
//!   that commits in one phase: `''` when it captured nothing (and no marker: nothing will be
//!   journaled to ask about it), otherwise it writes the marker and returns the whole redo,
//!   naming the transaction id and backend pid by which a later question can tell whether the
//!   branch still runs. It checks no fence: every pooled session holds the *session lock*
//!   (advisory, 1668247139, 1717923428) shared from its start, and reads the fence epoch after
//!   taking it, so a fence — which ends those sessions and takes the lock exclusively before it
//!   raises the epoch — cannot pass a live session of an older epoch.
//! * `concord.quick_check()` was sent in one round trip with the `COMMIT` of a branch expected
//!   to have nothing to replicate; it failed with `CF003` (so the `COMMIT` did not run) when the
//!   branch captured rows after all. Version 3 drops it; the step of version 2 no longer creates
//!   it, nor the version 2 body of `concord.capture_row()`, which version 3 replaces (install
//!   always runs the steps up to the newest version).
//!
//! Version 3 lets the client know without asking:
//!
//! * `concord.capture_row()` raises a notice with SQLSTATE `CF004` when a transaction captures
//!   its first row image (once per transaction, again after a rolled-back savepoint took the
//!   images back), lowering `client_min_messages` to `notice` for the rest of the transaction
//!   first if it was set higher, so that the notice is sent. The resource counts these notices
//!   per pooled session and commits a one-phase branch that raised none with a bare `COMMIT`
//!   (the adapter's `session` module). A session outside concord sees the notice too: its changes
//!   to a replicated table are captured and thrown away at its commit, and reach no standby.
//! * `concord.quick_check()` and `concord.has_redo()` are dropped.
//!
//! Version 4 closes three gaps of replay:
//!
//! * `concord.refuse_truncate()`, run by the statement trigger `concord_truncate` that
//!   `concord pg replicate` installs (and this step installs on every table already in
//!   `concord.replicated`), refuses a `TRUNCATE` of a replicated table (SQLSTATE `CF006`): a
//!   `TRUNCATE` fires no row trigger, so its effect would never reach a standby.
//! * `concord.apply_row()` refuses a row image whose columns are not the table's — a column
//!   the table lacks, or a column (not generated) the image lacks — naming the table and the
//!   column (SQLSTATE `CF005`), instead of writing a partial row.
//! * `concord.advance_sequences(tbl, row_image)`, called by `apply_row` after an upsert,
//!   advances every sequence that feeds a column of the table (a `nextval` default, `serial`,
//!   an identity column) past the value the image holds, so that a promoted standby does not
//!   hand out keys replay already wrote.

use tokio_postgres::Client;

/// The schema version this program installs and reads.
pub const SCHEMA_VERSION: i32 = 4;

/// Every step, in order: step `n` takes the schema from version `n` to `n + 1`.
const STEPS: &[&str] = &[V1, V2, V3, V4];

const V1: &str = r#"
CREATE TABLE concord.fence (
    id integer PRIMARY KEY CHECK (id = 1),
    epoch bigint NOT NULL CHECK (epoch >= 0)
);
INSERT INTO concord.fence VALUES (1, 0);

CREATE TABLE concord.markers (
    gid text PRIMARY KEY,
    xid text NOT NULL,
    node integer NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX markers_at ON concord.markers (at);

CREATE TABLE concord.applied (
    resource text PRIMARY KEY,
    lsn bigint NOT NULL
);

CREATE TABLE concord.capture (
    id bigserial PRIMARY KEY,
    txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    tbl text NOT NULL,
    op "char" NOT NULL,
    pk jsonb NOT NULL,
    row_image jsonb
);
CREATE INDEX capture_txid ON concord.capture (txid);

CREATE TABLE concord.replicated (
    tbl text PRIMARY KEY,
    pk_cols text[] NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION concord.check_fence(branch_epoch bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    current bigint;
BEGIN
    -- Shared, held until the (prepared) transaction ends; fence() takes it exclusively.
    PERFORM pg_advisory_xact_lock_shared(1668247139, 1717923427);
    IF current_setting('transaction_isolation') = 'read committed' THEN
        -- A new snapshot, taken after the lock: it sees every fence that committed before.
        SELECT epoch INTO current FROM concord.fence WHERE id = 1;
    ELSE
        -- The transaction's snapshot may predate a fence: a locking read of a row updated
        -- since fails to serialize instead of reading the old epoch.
        SELECT epoch INTO current FROM concord.fence WHERE id = 1 FOR SHARE;
    END IF;
    IF current > branch_epoch THEN
        RAISE EXCEPTION 'concord: epoch % is fenced (the database is at epoch %)', branch_epoch, current
            USING ERRCODE = 'CF001';
    END IF;
    RETURN current;
END $$;

-- concord.prepare_branch(), concord.capture_row() and concord.apply_row(): their bodies
-- are those of later steps (steps always run up to the newest version, which replaces them).
"#;

const V2: &str = r#"
-- Row images collect in a transaction-local setting (no table write, no WAL, nothing to vacuum)
-- until it holds 64 KiB; beyond, in concord.capture (column entry), which concord.spilled says.
-- The primary key is left to the reader (null): the row image holds it, and for a delete the
-- image is the old row. Only an update has to look at the key, to see whether it changed.
ALTER TABLE concord.capture ALTER COLUMN pk DROP NOT NULL;
ALTER TABLE concord.capture ADD COLUMN IF NOT EXISTS entry text;

-- concord.capture_row() collects each image in the setting concord.redo: its body is
-- version 3's (steps always run up to the newest version, which replaces it).

-- concord.apply_row(), replay of an image whose key the capture left to the reader: its body
-- is version 4's (steps always run up to the newest version, which replaces it).

-- The branch's row images as the JSON text of an array's elements ('' when none), taken out
-- of the setting and the capture table.
CREATE OR REPLACE FUNCTION concord.take_rows() RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    rows text := coalesce(current_setting('concord.redo', true), '');
    spilled text;
BEGIN
    IF current_setting('concord.spilled', true) = 'on' THEN
        WITH d AS (DELETE FROM concord.capture WHERE txid = pg_current_xact_id()
                   RETURNING id, tbl, op, pk, row_image, entry)
        SELECT string_agg(coalesce(entry, json_build_array(tbl, op::text, pk, row_image)::text),
                          ',' ORDER BY id)
            INTO spilled FROM d;
        IF spilled IS NOT NULL THEN
            rows := CASE WHEN rows = '' THEN spilled ELSE rows || ',' || spilled END;
        END IF;
        PERFORM set_config('concord.spilled', '', true);
    END IF;
    PERFORM set_config('concord.redo', '', true);
    RETURN rows;
END $$;

CREATE OR REPLACE FUNCTION concord.prepare_branch(branch_epoch bigint, branch_gid text,
                                                  branch_xid text, branch_node integer)
    RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    rows text;
BEGIN
    IF pg_current_xact_id_if_assigned() IS NULL THEN
        RAISE EXCEPTION 'concord: the branch wrote nothing' USING ERRCODE = 'CF002';
    END IF;
    PERFORM concord.check_fence(branch_epoch);
    rows := concord.take_rows();
    INSERT INTO concord.markers (gid, xid, node) VALUES (branch_gid, branch_xid, branch_node);
    RETURN '[' || rows || ']';
END $$;

-- A one-phase branch's end: the redo, the transaction left open. '' when nothing was captured
-- (no marker then); otherwise the marker is written and the whole redo returned, naming the
-- transaction and the backend. No fence check: the branch's session holds the session lock
-- (1668247139, 1717923428) shared, which a fence must take exclusively after ending it.
CREATE OR REPLACE FUNCTION concord.finish_branch(branch_gid text, branch_xid text,
                                                 branch_node integer) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    rows text := concord.take_rows();
BEGIN
    IF rows = '' THEN
        RETURN '';
    END IF;
    INSERT INTO concord.markers (gid, xid, node) VALUES (branch_gid, branch_xid, branch_node);
    RETURN format('{"v":1,"txid":"%s","pid":%s,"rows":[%s]}',
                  pg_current_xact_id(), pg_backend_pid(), rows);
END $$;

"#;

const V3: &str = r#"
-- Each row image collects in the transaction-local setting concord.redo until it holds 64 KiB,
-- then in concord.capture (see version 2). The first image of a transaction raises a notice
-- (SQLSTATE CF004), so that the client knows the branch has redo without asking;
-- client_min_messages is lowered for the transaction if it would suppress the notice. The check
-- version 2 sent with a one-phase COMMIT (quick_check, has_redo) is no longer needed.
DROP FUNCTION IF EXISTS concord.quick_check();
DROP FUNCTION IF EXISTS concord.has_redo();

CREATE OR REPLACE FUNCTION concord.capture_row() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    tbl text;
    entry text;
    old_image jsonb;
    new_image jsonb;
    moved boolean := false;
    k text;
    acc text;
BEGIN
    IF current_setting('concord.replaying', true) = 'on' THEN
        RETURN NULL;
    END IF;
    tbl := quote_ident(TG_TABLE_SCHEMA) || '.' || quote_ident(TG_TABLE_NAME);
    IF TG_OP = 'INSERT' THEN
        entry := json_build_array(tbl, 'U', NULL, to_json(NEW))::text;
    ELSIF TG_OP = 'DELETE' THEN
        entry := json_build_array(tbl, 'D', NULL, to_json(OLD))::text;
    ELSE
        old_image := to_jsonb(OLD);
        new_image := to_jsonb(NEW);
        FOREACH k IN ARRAY TG_ARGV LOOP
            IF old_image -> k IS DISTINCT FROM new_image -> k THEN
                moved := true;
            END IF;
        END LOOP;
        entry := json_build_array(tbl, 'U', NULL, new_image)::text;
        IF moved THEN
            entry := json_build_array(tbl, 'D', NULL, old_image)::text || ',' || entry;
        END IF;
    END IF;
    acc := current_setting('concord.redo', true);
    IF acc IS NULL OR acc = '' THEN
        IF current_setting('client_min_messages') IN ('warning', 'error') THEN
            PERFORM set_config('client_min_messages', 'notice', true);
        END IF;
        RAISE NOTICE 'concord: row images captured (changes to replicated tables reach a standby only through a concord branch)'
            USING ERRCODE = 'CF004';
        PERFORM set_config('concord.redo', entry, true);
    ELSIF octet_length(acc) <= 65536 THEN
        PERFORM set_config('concord.redo', acc || ',' || entry, true);
    ELSE
        -- Once spilled, always spilled (the setting stays full): the order holds.
        PERFORM set_config('concord.spilled', 'on', true);
        INSERT INTO concord.capture (tbl, op, entry) VALUES (tbl, 'E', entry);
    END IF;
    RETURN NULL;
END $$;
"#;

const V4: &str = r#"
-- A TRUNCATE has no row images, so a standby would never see it: refused on a replicated table.
CREATE OR REPLACE FUNCTION concord.refuse_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'concord: TRUNCATE of the replicated table %.% is refused: a standby replays row images, and a TRUNCATE has none', TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'CF006',
              HINT = 'delete the rows instead (DELETE FROM the table), or, for a table that no longer needs a standby, drop its triggers concord_capture and concord_truncate';
END $$;

DO $$
DECLARE
    t text;
BEGIN
    FOR t IN SELECT tbl FROM concord.replicated WHERE to_regclass(tbl) IS NOT NULL LOOP
        EXECUTE format('CREATE OR REPLACE TRIGGER concord_truncate BEFORE TRUNCATE ON %s
                        FOR EACH STATEMENT EXECUTE FUNCTION concord.refuse_truncate()', t);
    END LOOP;
END $$;

-- Advances each sequence that feeds a column of tbl (a default of nextval, serial, identity)
-- past the value row_image holds in that column, so that a promoted standby does not hand out
-- a key replay already wrote. setval is not transactional: a replay rolled back may leave a
-- sequence further on, never behind.
CREATE OR REPLACE FUNCTION concord.advance_sequences(tbl text, row_image jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    fed record;
    written numeric;
    issued numeric;
BEGIN
    FOR fed IN
        SELECT a.attname AS col, d.refobjid::regclass::text AS seq
          FROM pg_attribute a
          JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
          JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
                          AND d.refclassid = 'pg_class'::regclass
          JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S'
         WHERE a.attrelid = tbl::regclass AND a.attnum > 0 AND NOT a.attisdropped
        UNION
        SELECT a.attname, pg_get_serial_sequence(tbl, a.attname)
          FROM pg_attribute a
         WHERE a.attrelid = tbl::regclass AND a.attnum > 0 AND NOT a.attisdropped
           AND a.attidentity <> ''
    LOOP
        -- A sequence feeds numbers; a column it feeds that holds something else is left alone.
        CONTINUE WHEN jsonb_typeof(row_image -> fed.col) IS DISTINCT FROM 'number';
        written := (row_image ->> fed.col)::numeric;
        EXECUTE format('SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM %s',
                       fed.seq) INTO issued;
        IF written > issued THEN
            PERFORM setval(fed.seq, written::bigint);
        END IF;
    END LOOP;
END $$;

-- Replay of one row image by primary key. The image's columns must be the table's: a column the
-- table lacks, or a column (not generated) the image lacks, stops replay naming both (SQLSTATE
-- CF005) instead of writing a partial row.
CREATE OR REPLACE FUNCTION concord.apply_row(tbl text, op "char", pk jsonb, row_image jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    cond text;
    cols text;
    keys text;
    sets text;
    odd text;
BEGIN
    IF jsonb_typeof(row_image) = 'object' THEN
        SELECT k INTO odd FROM jsonb_object_keys(row_image) AS k
         WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a
                            WHERE a.attrelid = tbl::regclass AND a.attnum > 0
                              AND NOT a.attisdropped AND a.attname = k)
         LIMIT 1;
        IF odd IS NOT NULL THEN
            RAISE EXCEPTION 'concord: the row image of % has a column %, which the table here does not have', tbl, odd
                USING ERRCODE = 'CF005';
        END IF;
        SELECT a.attname INTO odd FROM pg_attribute a
         WHERE a.attrelid = tbl::regclass AND a.attnum > 0 AND NOT a.attisdropped
           AND a.attgenerated = '' AND NOT row_image ? a.attname
         ORDER BY a.attnum LIMIT 1;
        IF odd IS NOT NULL THEN
            RAISE EXCEPTION 'concord: the row image of % has no column %, which the table here has', tbl, odd
                USING ERRCODE = 'CF005';
        END IF;
    END IF;
    IF pk IS NULL OR jsonb_typeof(pk) = 'null' THEN
        -- Left to the reader by the capture: the key's columns of the image.
        SELECT jsonb_object_agg(a.attname, row_image -> a.attname) INTO pk
            FROM pg_index i
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
            WHERE i.indrelid = tbl::regclass AND i.indisprimary;
        IF pk IS NULL THEN
            RAISE EXCEPTION 'concord: table % has no primary key to replay by', tbl;
        END IF;
    END IF;
    IF op = 'D' THEN
        SELECT string_agg(format('%I = (jsonb_populate_record(NULL::%s, $1)).%I', k, tbl, k), ' AND ')
            INTO cond FROM jsonb_object_keys(pk) AS k;
        EXECUTE format('DELETE FROM %s WHERE %s', tbl, cond) USING pk;
        RETURN;
    END IF;
    -- An upsert, not a delete and insert: rows that reference this one stay, and identity
    -- columns take the primary's values; generated columns are computed again.
    SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum),
           string_agg(format('%1$I = excluded.%1$I', a.attname), ', ' ORDER BY a.attnum)
               FILTER (WHERE NOT pk ? a.attname AND a.attidentity <> 'a')
        INTO cols, sets
        FROM pg_attribute a
        WHERE a.attrelid = tbl::regclass AND a.attnum > 0 AND NOT a.attisdropped
          AND a.attgenerated = '';
    SELECT string_agg(quote_ident(k), ', ') INTO keys FROM jsonb_object_keys(pk) AS k;
    EXECUTE format(
        'INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM jsonb_populate_record(NULL::%s, $1) ON CONFLICT (%s) DO %s',
        tbl, cols, cols, tbl, keys,
        CASE WHEN sets IS NULL THEN 'NOTHING' ELSE 'UPDATE SET ' || sets END) USING row_image;
    PERFORM concord.advance_sequences(tbl, row_image);
END $$;
"#;

/// What [`install`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Installed {
    /// The version found (0: no schema).
    pub from: i32,
    /// The version now.
    pub to: i32,
}

/// Why the schema is not usable.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// No `concord` schema.
    #[error(
        "the concord schema is not installed in this database; run `concord pg install --resource {resource}`"
    )]
    Missing {
        /// The resource name, for the command.
        resource: String,
    },
    /// An older schema.
    #[error(
        "the concord schema is at version {found}, this program needs {SCHEMA_VERSION}; run `concord pg install --resource {resource}` to upgrade it"
    )]
    Older {
        /// The version found.
        found: i32,
        /// The resource name, for the command.
        resource: String,
    },
    /// A newer schema.
    #[error(
        "the concord schema is at version {found}, newer than this program's {SCHEMA_VERSION}; upgrade concord"
    )]
    Newer {
        /// The version found.
        found: i32,
    },
    /// The database refused.
    #[error("{0}")]
    Db(#[from] tokio_postgres::Error),
}

/// The installed version (0 when there is no schema).
pub async fn version(client: &Client) -> Result<i32, tokio_postgres::Error> {
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = 'concord' AND tablename = 'meta')",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let row = client
        .query_opt(
            "SELECT value FROM concord.meta WHERE key = 'schema_version'",
            &[],
        )
        .await?;
    Ok(row
        .and_then(|r| r.get::<_, String>(0).parse().ok())
        .unwrap_or(0))
}

/// Refuses a schema this program cannot use.
pub async fn check(client: &Client, resource: &str) -> Result<(), SchemaError> {
    match version(client).await? {
        0 => Err(SchemaError::Missing {
            resource: resource.to_string(),
        }),
        v if v < SCHEMA_VERSION => Err(SchemaError::Older {
            found: v,
            resource: resource.to_string(),
        }),
        v if v > SCHEMA_VERSION => Err(SchemaError::Newer { found: v }),
        _ => Ok(()),
    }
}

/// Installs or upgrades the schema; see the module docs.
pub async fn install(client: &mut Client) -> Result<Installed, SchemaError> {
    let tx = client.transaction().await?;
    // One install at a time in this database.
    tx.execute("SELECT pg_advisory_xact_lock(7314823)", &[])
        .await?;
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS concord;
         CREATE TABLE IF NOT EXISTS concord.meta (key text PRIMARY KEY, value text NOT NULL)",
    )
    .await?;
    let from = tx
        .query_opt(
            "SELECT value FROM concord.meta WHERE key = 'schema_version'",
            &[],
        )
        .await?
        .and_then(|r| r.get::<_, String>(0).parse::<i32>().ok())
        .unwrap_or(0);
    if from > SCHEMA_VERSION {
        return Err(SchemaError::Newer { found: from });
    }
    for step in STEPS.iter().skip(usize::try_from(from).unwrap_or(0)) {
        tx.batch_execute(step).await?;
    }
    tx.execute(
        "INSERT INTO concord.meta VALUES ('schema_version', $1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        &[&SCHEMA_VERSION.to_string()],
    )
    .await?;
    tx.commit().await?;
    Ok(Installed {
        from,
        to: SCHEMA_VERSION,
    })
}

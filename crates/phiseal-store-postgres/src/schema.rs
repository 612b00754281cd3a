//! The embedded, versioned schema and the migration runner.

use crate::error::PostgresStoreError;
use crate::{DEFAULT_SCHEMA, Inner};

/// The schema version this build creates and reads (the highest `schema_migrations.version`).
pub const SCHEMA_VERSION: u32 = 1;

/// One schema change. Applied in its own transaction, in order, exactly once per database.
struct Migration {
    version: u32,
    description: &'static str,
    sql: &'static str,
}

/// Every migration, ascending and contiguous from 1. Never edit a released entry: append.
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "tenants and key_versions",
    sql: "
CREATE TABLE tenants (
    tenant text PRIMARY KEY
        CONSTRAINT tenants_tenant_id_format CHECK (tenant ~ '^[A-Za-z0-9._:-]{1,128}$'),
    min_decrypt_version bigint NOT NULL
        CONSTRAINT tenants_min_decrypt_version_range
        CHECK (min_decrypt_version BETWEEN 1 AND 4294967295),
    shredded_at timestamptz NULL,
    created_at timestamptz NOT NULL
);
CREATE TABLE key_versions (
    tenant text NOT NULL REFERENCES tenants (tenant),
    version bigint NOT NULL
        CONSTRAINT key_versions_version_range CHECK (version BETWEEN 1 AND 4294967295),
    state text NOT NULL
        CONSTRAINT key_versions_state_known
        CHECK (state IN ('primary', 'decrypt_only', 'destroyed')),
    root_key_ref text NULL,
    wrapped bytea NULL,
    key_check bytea NOT NULL
        CONSTRAINT key_versions_key_check_length CHECK (octet_length(key_check) = 32),
    created_at timestamptz NOT NULL,
    PRIMARY KEY (tenant, version),
    CONSTRAINT key_versions_wrapped_matches_state CHECK (
        CASE WHEN state = 'destroyed' THEN wrapped IS NULL AND root_key_ref IS NULL
             ELSE wrapped IS NOT NULL AND root_key_ref IS NOT NULL END
    )
);
CREATE UNIQUE INDEX key_versions_one_primary ON key_versions (tenant) WHERE state = 'primary';
",
}];

/// Serializes migrators of one database (advisory locks are per database):
/// `'phiseal'` as a big-endian integer.
const MIGRATION_LOCK: i64 = 0x0070_6869_7365_616c;

const CREATE_MIGRATIONS_TABLE: &str = "
CREATE TABLE IF NOT EXISTS schema_migrations (
    version bigint PRIMARY KEY,
    description text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

impl Inner {
    /// The highest applied migration, 0 if `schema_migrations` does not exist.
    pub(crate) async fn schema_version(&self) -> Result<u32, PostgresStoreError> {
        let action = "read the schema version";
        self.timed(action, async {
            let client = self.client(action).await?;
            let row = client
                .query_one(
                    "SELECT pg_catalog.to_regclass('schema_migrations') IS NOT NULL",
                    &[],
                )
                .await
                .map_err(self.db(action))?;
            let exists: bool = row.try_get(0).map_err(self.db(action))?;
            if !exists {
                return Ok(0);
            }
            let row = client
                .query_one(
                    "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                    &[],
                )
                .await
                .map_err(self.db(action))?;
            self.version_from(row.try_get(0).map_err(self.db(action))?)
        })
        .await
    }

    fn version_from(&self, raw: i64) -> Result<u32, PostgresStoreError> {
        u32::try_from(raw).map_err(|_| PostgresStoreError::Corrupt {
            detail: format!("schema_migrations holds version {raw}, outside 0..=2^32-1"),
        })
    }

    /// Applies every pending migration, each in its own transaction under an advisory lock, and
    /// returns the versions applied (empty if the schema was current).
    pub(crate) async fn migrate(&self) -> Result<Vec<u32>, PostgresStoreError> {
        let found = self.checked_schema_version().await?;
        if found > SCHEMA_VERSION {
            return Err(PostgresStoreError::SchemaTooNew {
                target: self.target.to_string(),
                found,
            });
        }
        if found == SCHEMA_VERSION {
            // The common case needs no lock and no DDL privilege.
            return Ok(Vec::new());
        }
        let mut applied = Vec::new();
        while let Some(version) = self.migrate_one().await? {
            applied.push(version);
        }
        Ok(applied)
    }

    /// The schema version, read only once the schema passed [`Inner::check_rights`] (nothing
    /// in an unchecked schema is ever resolved: a view there could run another role's code as
    /// the store's role), and, when it holds no tables yet, after
    /// [`Inner::check_earlier_layout`].
    pub(crate) async fn checked_schema_version(&self) -> Result<u32, PostgresStoreError> {
        let action = "check the store's schema";
        self.timed(action, async {
            let mut client = self.client(action).await?;
            let tx = client.transaction().await.map_err(self.db(action))?;
            self.check_rights(&tx).await?;
            tx.rollback().await.map_err(self.db(action))
        })
        .await?;
        let found = self.schema_version().await?;
        if found == 0 {
            self.check_earlier_layout().await?;
        }
        Ok(found)
    }

    /// With the default schema, while it holds no tables: refuses to start an empty store if
    /// the role's own search path finds the three tables of an earlier build in another schema
    /// (builds before the schema setting created them in the first schema of that path), which
    /// would look as if every tenant had vanished. A schema chosen explicitly is taken as
    /// meant (another deployment of the same role may be found on its path).
    async fn check_earlier_layout(&self) -> Result<(), PostgresStoreError> {
        if *self.schema != *DEFAULT_SCHEMA {
            return Ok(());
        }
        let action = "look for an earlier build's tables";
        self.timed(action, async {
            let mut client = self.client(action).await?;
            let tx = client.transaction().await.map_err(self.db(action))?;
            // The role's own search path, as the session had it before the store set its own.
            // Nothing but this fully qualified call runs under it: another role's objects on
            // that path (an operator, a function) must never be resolved by the store.
            tx.batch_execute("SET LOCAL search_path TO DEFAULT")
                .await
                .map_err(self.db(action))?;
            let row = tx
                .query_one("SELECT pg_catalog.current_schemas(false)", &[])
                .await
                .map_err(self.db(action))?;
            let path: Vec<String> = row.try_get(0).map_err(self.db(action))?;
            tx.batch_execute("SET LOCAL search_path = pg_catalog, pg_temp")
                .await
                .map_err(self.db(action))?;
            let rows = tx
                .query(
                    "SELECT n.nspname FROM pg_catalog.pg_namespace n
                     WHERE (SELECT pg_catalog.count(*) FROM pg_catalog.pg_class c
                            WHERE c.relnamespace OPERATOR(pg_catalog.=) n.oid
                              AND c.relname OPERATOR(pg_catalog.=) ANY (ARRAY[
                                  'schema_migrations', 'tenants', 'key_versions'
                              ]::pg_catalog.name[])) OPERATOR(pg_catalog.=) 3",
                    &[],
                )
                .await
                .map_err(self.db(action))?;
            tx.rollback().await.map_err(self.db(action))?;
            let holding = rows
                .iter()
                .map(|r| r.try_get::<_, String>(0))
                .collect::<Result<Vec<_>, _>>()
                .map_err(self.db(action))?;
            let Some(other) = path
                .iter()
                .find(|s| **s != *self.schema && holding.contains(s))
            else {
                return Ok(());
            };
            let (other, schema) = (ident(other), ident(&self.schema));
            Err(self.unsafe_schema(format!(
                "it holds no key tables yet, but the role's search path finds them in schema \
                 {other} (where builds without the schema setting created them); refusing to \
                 start an empty key store next to them: set the store's schema to {other}, or \
                 move the three tables (CREATE SCHEMA {schema} AUTHORIZATION <the store's \
                 role>; ALTER TABLE {other}.schema_migrations SET SCHEMA {schema}; likewise \
                 tenants and key_versions)"
            )))
        })
        .await
    }

    fn unsafe_schema(&self, problem: String) -> PostgresStoreError {
        PostgresStoreError::UnsafeSchema {
            target: self.target.to_string(),
            schema: self.schema.to_string(),
            problem,
        }
    }

    /// Refuses the store's schema, if it exists, unless: its owner is the store's role itself,
    /// the configured `schema_owner`, or `pg_database_owner` with the store's role owning the
    /// database; the store's role may use it; only trusted roles (those, and each table's
    /// owner) may create objects in it or change its tables (`INSERT`, `UPDATE`, `DELETE`,
    /// `TRUNCATE`, `TRIGGER`, `REFERENCES`); its tables have no triggers (the store creates
    /// none); and every object in it belongs to a trusted role. Any other role that could
    /// create, own or trigger on objects there could put its own code in the store's way.
    /// Membership in another role does not count (a superuser is a member of every role).
    /// Fully qualified throughout.
    async fn check_rights(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<(), PostgresStoreError> {
        let action = "check the rights on the store's schema";
        let db = |e| self.db(action)(e);
        let row = tx
            .query_opt(
                "SELECT n.oid,
                        pg_catalog.pg_get_userbyid(n.nspowner)::pg_catalog.text,
                        pg_catalog.has_schema_privilege(n.oid, 'USAGE'),
                        current_user::pg_catalog.text,
                        (SELECT pg_catalog.pg_get_userbyid(d.datdba)::pg_catalog.text
                         FROM pg_catalog.pg_database d
                         WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()),
                        ARRAY(SELECT CASE WHEN a.grantee OPERATOR(pg_catalog.=) 0::pg_catalog.oid
                                          THEN NULL
                                          ELSE pg_catalog.pg_get_userbyid(a.grantee)::pg_catalog.text
                                     END
                              FROM pg_catalog.aclexplode(n.nspacl) AS a
                              WHERE a.privilege_type OPERATOR(pg_catalog.=) 'CREATE'
                                AND a.grantee OPERATOR(pg_catalog.<>) n.nspowner)
                 FROM pg_catalog.pg_namespace n
                 WHERE n.nspname OPERATOR(pg_catalog.=) $1",
                &[&&*self.schema],
            )
            .await
            .map_err(db)?;
        // A schema that does not exist yet is created by the migration (which checks again).
        let Some(row) = row else {
            return Ok(());
        };
        let oid: u32 = row.try_get(0).map_err(db)?;
        let owner: String = row.try_get(1).map_err(db)?;
        let usage: bool = row.try_get(2).map_err(db)?;
        let role: String = row.try_get(3).map_err(db)?;
        let database_owner: Option<String> = row.try_get(4).map_err(db)?;
        let creators: Vec<Option<String>> = row.try_get(5).map_err(db)?;
        let owner_trusted = owner == role
            || self.schema_owner.as_deref() == Some(owner.as_str())
            || (owner == "pg_database_owner" && database_owner.as_deref() == Some(role.as_str()));
        let schema = ident(&self.schema);
        if !owner_trusted {
            return Err(self.unsafe_schema(format!(
                "it is owned by role {}, not by the store's role ({}), so that role could \
                 replace the store's tables; make the store's role own it (ALTER SCHEMA \
                 {schema} OWNER TO {}), or, if that role is an administrator's that owns the \
                 schema and its tables (a least-privilege set-up, or `public` owned by its \
                 bootstrap superuser or pg_database_owner), name it in the schema_owner \
                 setting",
                ident(&owner),
                ident(&role),
                ident(&role)
            )));
        }
        let mut trusted = vec![role.clone(), owner];
        trusted.extend(self.schema_owner.as_deref().map(str::to_owned));
        if !usage {
            return Err(self.unsafe_schema(format!(
                "the store's role ({}) may not use it: GRANT USAGE ON SCHEMA {schema} TO {}",
                ident(&role),
                ident(&role)
            )));
        }
        let creators: Vec<String> = creators
            .iter()
            .filter(|c| c.as_ref().is_none_or(|c| !trusted.contains(c)))
            .map(|c| c.as_deref().map_or_else(|| "PUBLIC".to_owned(), ident))
            .collect();
        if !creators.is_empty() {
            let names = creators.join(", ");
            return Err(self.unsafe_schema(format!(
                "roles other than its owner may create objects in it (CREATE is granted to \
                 {names}), so they could create the store's tables there first, or objects \
                 in their way; run REVOKE CREATE ON SCHEMA {schema} FROM {names}"
            )));
        }
        // Objects of untrusted roles (the table owners are checked with them).
        let rows = tx
            .query(
                "SELECT o.name, pg_catalog.pg_get_userbyid(o.owner)::pg_catalog.text FROM (
                     SELECT c.relname::pg_catalog.text AS name, c.relowner AS owner
                     FROM pg_catalog.pg_class c WHERE c.relnamespace OPERATOR(pg_catalog.=) $1
                     UNION ALL
                     SELECT p.proname::pg_catalog.text, p.proowner
                     FROM pg_catalog.pg_proc p WHERE p.pronamespace OPERATOR(pg_catalog.=) $1
                     UNION ALL
                     SELECT o.oprname::pg_catalog.text, o.oprowner
                     FROM pg_catalog.pg_operator o WHERE o.oprnamespace OPERATOR(pg_catalog.=) $1
                     UNION ALL
                     SELECT t.typname::pg_catalog.text, t.typowner
                     FROM pg_catalog.pg_type t WHERE t.typnamespace OPERATOR(pg_catalog.=) $1
                 ) AS o
                 WHERE pg_catalog.pg_get_userbyid(o.owner)::pg_catalog.text
                       OPERATOR(pg_catalog.<>) ALL ($2::pg_catalog.text[])
                 ORDER BY 1 LIMIT 5",
                &[&oid, &trusted],
            )
            .await
            .map_err(db)?;
        let foreign = rows
            .iter()
            .map(|r| -> Result<String, PostgresStoreError> {
                let name: String = r.try_get(0).map_err(db)?;
                let owner: String = r.try_get(1).map_err(db)?;
                Ok(format!("{} (owner {})", ident(&name), ident(&owner)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !foreign.is_empty() {
            return Err(self.unsafe_schema(format!(
                "it holds objects that belong to neither its owner nor the store's role ({}), \
                 whose owners could change what the store reads and writes; drop them, or \
                 give them to the schema's owner",
                foreign.join(", ")
            )));
        }
        // Rights to change the tables (or to put triggers on them) held by untrusted roles:
        // on a whole table (`relacl`) or on some of its columns (`attacl`: `GRANT UPDATE
        // (min_decrypt_version) ON tenants TO …` would let a role lower a minimum version).
        let rows = tx
            .query(
                "SELECT g.tab, g.col,
                        CASE WHEN g.grantee OPERATOR(pg_catalog.=) 0::pg_catalog.oid THEN NULL
                             ELSE pg_catalog.pg_get_userbyid(g.grantee)::pg_catalog.text END,
                        g.privilege_type
                 FROM (
                     SELECT c.relname::pg_catalog.text AS tab, NULL::pg_catalog.text AS col,
                            a.grantee, a.privilege_type
                     FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) AS a
                     WHERE c.relnamespace OPERATOR(pg_catalog.=) $1
                     UNION ALL
                     SELECT c.relname::pg_catalog.text, t.attname::pg_catalog.text,
                            a.grantee, a.privilege_type
                     FROM pg_catalog.pg_class c
                     JOIN pg_catalog.pg_attribute t
                       ON t.attrelid OPERATOR(pg_catalog.=) c.oid
                     , pg_catalog.aclexplode(t.attacl) AS a
                     WHERE c.relnamespace OPERATOR(pg_catalog.=) $1
                       AND t.attnum OPERATOR(pg_catalog.>) 0 AND NOT t.attisdropped
                 ) AS g
                 WHERE g.privilege_type OPERATOR(pg_catalog.=) ANY (ARRAY[
                       'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'TRIGGER', 'REFERENCES'
                   ]::pg_catalog.text[])
                   AND (g.grantee OPERATOR(pg_catalog.=) 0::pg_catalog.oid
                        OR pg_catalog.pg_get_userbyid(g.grantee)::pg_catalog.text
                           OPERATOR(pg_catalog.<>) ALL ($2::pg_catalog.text[]))
                 ORDER BY 1, 2 NULLS FIRST, 3, 4 LIMIT 5",
                &[&oid, &trusted],
            )
            .await
            .map_err(db)?;
        let grants = rows
            .iter()
            .map(|r| -> Result<String, PostgresStoreError> {
                let table: String = r.try_get(0).map_err(db)?;
                let column: Option<String> = r.try_get(1).map_err(db)?;
                let grantee: Option<String> = r.try_get(2).map_err(db)?;
                let privilege: String = r.try_get(3).map_err(db)?;
                let grantee = grantee
                    .as_deref()
                    .map_or_else(|| "PUBLIC".to_owned(), ident);
                let what = match column {
                    Some(column) => format!("{}({})", ident(&table), ident(&column)),
                    None => ident(&table),
                };
                Ok(format!("{privilege} on {what} to {grantee}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !grants.is_empty() {
            return Err(self.unsafe_schema(format!(
                "other roles may change the store's tables or put triggers on them ({}); \
                 revoke those rights (only SELECT may be granted to other roles)",
                grants.join(", ")
            )));
        }
        let rows = tx
            .query(
                "SELECT c.relname::pg_catalog.text, t.tgname::pg_catalog.text
                 FROM pg_catalog.pg_trigger t
                 JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.tgrelid
                 WHERE c.relnamespace OPERATOR(pg_catalog.=) $1 AND NOT t.tgisinternal
                 ORDER BY 1, 2 LIMIT 5",
                &[&oid],
            )
            .await
            .map_err(db)?;
        let triggers = rows
            .iter()
            .map(|r| -> Result<String, PostgresStoreError> {
                let table: String = r.try_get(0).map_err(db)?;
                let trigger: String = r.try_get(1).map_err(db)?;
                Ok(format!("{} on {}", ident(&trigger), ident(&table)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !triggers.is_empty() {
            return Err(self.unsafe_schema(format!(
                "its tables have triggers ({}), which would run their functions on the \
                 store's writes; the store creates none: drop them",
                triggers.join(", ")
            )));
        }
        Ok(())
    }

    /// Applies the next pending migration; `None` if there is none.
    async fn migrate_one(&self) -> Result<Option<u32>, PostgresStoreError> {
        let action = "migrate the schema";
        self.timed(action, async {
            let mut client = self.client(action).await?;
            let tx = client.transaction().await.map_err(self.db(action))?;
            tx.query_one(
                "SELECT pg_catalog.pg_advisory_xact_lock($1::pg_catalog.int8)",
                &[&MIGRATION_LOCK],
            )
            .await
            .map_err(self.db("take the schema migration lock"))?;
            let row = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace
                                    WHERE nspname OPERATOR(pg_catalog.=) $1)",
                    &[&&*self.schema],
                )
                .await
                .map_err(self.db("look up the store's schema"))?;
            if !row.try_get::<_, bool>(0).map_err(self.db(action))? {
                // Created (and so owned) by this role; a schema an administrator created
                // beforehand is used as it is.
                tx.batch_execute(&format!("CREATE SCHEMA \"{}\"", self.schema))
                    .await
                    .map_err(self.db("create the store's schema"))?;
            }
            // Again under the lock, in this transaction: the schema may have appeared (or
            // changed) since the check before the migration.
            self.check_rights(&tx).await?;
            tx.batch_execute(CREATE_MIGRATIONS_TABLE)
                .await
                .map_err(self.db("create the schema_migrations table"))?;
            let row = tx
                .query_one(
                    "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                    &[],
                )
                .await
                .map_err(self.db(action))?;
            let current = self.version_from(row.try_get(0).map_err(self.db(action))?)?;
            if current > SCHEMA_VERSION {
                return Err(PostgresStoreError::SchemaTooNew {
                    target: self.target.to_string(),
                    found: current,
                });
            }
            let Some(next) = MIGRATIONS.iter().find(|m| m.version == current + 1) else {
                // Up to date (another process may have migrated while we waited).
                tx.commit().await.map_err(self.db(action))?;
                return Ok(None);
            };
            tx.batch_execute(next.sql)
                .await
                .map_err(self.db("apply a schema migration"))?;
            tx.execute(
                "INSERT INTO schema_migrations (version, description) VALUES ($1, $2)",
                &[&i64::from(next.version), &next.description],
            )
            .await
            .map_err(self.db("record the schema migration"))?;
            tx.commit()
                .await
                .map_err(self.db("commit the schema migration"))?;
            Ok(Some(next.version))
        })
        .await
    }
}

/// `name` as a double-quoted SQL identifier for messages: `"` doubled, control characters
/// escaped, at most 64 characters (names read from the database are not ours).
pub(crate) fn ident(name: &str) -> String {
    let mut out = String::from("\"");
    for c in name.chars().take(64) {
        match c {
            '"' => out.push_str("\"\""),
            c if c.is_control() => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_contiguous_and_end_at_the_schema_version() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(u32::try_from(i + 1).ok(), Some(m.version));
        }
        assert_eq!(MIGRATIONS.last().map(|m| m.version), Some(SCHEMA_VERSION));
    }
}

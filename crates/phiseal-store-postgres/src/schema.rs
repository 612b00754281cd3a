//! The embedded, versioned schema and the migration runner.

use crate::Inner;
use crate::error::PostgresStoreError;

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
                .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
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
        let found = self.schema_version().await?;
        self.check_placement(found).await?;
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

    /// Refuses a store schema that every role may create objects in, and, while the store's
    /// schema holds no tables yet (`found` is 0), key tables that an earlier build left where
    /// the role's own search path put them: starting an empty store next to them would look
    /// as if every tenant had vanished.
    pub(crate) async fn check_placement(&self, found: u32) -> Result<(), PostgresStoreError> {
        let action = "check the store's schema";
        let unsafe_schema = |problem: String| PostgresStoreError::UnsafeSchema {
            target: self.target.to_string(),
            schema: self.schema.to_string(),
            problem,
        };
        self.timed(action, async {
            let mut client = self.client(action).await?;
            let row = client
                .query_one(
                    "SELECT COALESCE((SELECT has_schema_privilege('public', oid, 'CREATE')
                                      FROM pg_namespace WHERE nspname = $1), false)",
                    &[&&*self.schema],
                )
                .await
                .map_err(self.db(action))?;
            if row.try_get::<_, bool>(0).map_err(self.db(action))? {
                return Err(unsafe_schema(format!(
                    "every role may create objects in it (CREATE is granted to PUBLIC), so \
                     another role could create the store's tables there first, owned by it; \
                     run REVOKE CREATE ON SCHEMA {} FROM PUBLIC",
                    self.schema
                )));
            }
            if found != 0 {
                return Ok(());
            }
            // Where the role's own search path (the session's default, before the store set
            // its own) finds the key tables, if anywhere.
            let tx = client.transaction().await.map_err(self.db(action))?;
            tx.batch_execute("SET LOCAL search_path TO DEFAULT")
                .await
                .map_err(self.db(action))?;
            let row = tx
                .query_opt(
                    "SELECT n.nspname::text FROM pg_class c
                     JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE c.oid = to_regclass('key_versions')",
                    &[],
                )
                .await
                .map_err(self.db(action))?;
            tx.rollback().await.map_err(self.db(action))?;
            let elsewhere: Option<String> = row
                .map(|r| r.try_get(0))
                .transpose()
                .map_err(self.db(action))?;
            match elsewhere {
                Some(other) if other != *self.schema => Err(unsafe_schema(format!(
                    "it holds no key tables yet, but the role's search path finds them in \
                     schema \"{other}\" (where builds without the schema setting created \
                     them); refusing to start an empty key store next to them: set the store's \
                     schema to \"{other}\", or move the three tables (ALTER TABLE \
                     {other}.schema_migrations SET SCHEMA {schema}; likewise tenants and \
                     key_versions)",
                    schema = self.schema
                ))),
                _ => Ok(()),
            }
        })
        .await
    }

    /// Applies the next pending migration; `None` if there is none.
    async fn migrate_one(&self) -> Result<Option<u32>, PostgresStoreError> {
        let action = "migrate the schema";
        self.timed(action, async {
            let mut client = self.client(action).await?;
            let tx = client.transaction().await.map_err(self.db(action))?;
            tx.query_one("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(self.db("take the schema migration lock"))?;
            let row = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
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

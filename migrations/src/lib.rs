//! Starling's database schema as sqlx migrations, one set per supported database,
//! embedded in the binary (no migration files needed at run time).
//!
//! The SQL lives in `migrations/postgres/` and `migrations/sqlite/`; both sets must
//! describe the same logical schema (the control plane's storage conformance tests run
//! against both).

use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};

macro_rules! migrations {
    ($dir:literal: $(($version:literal, $name:literal, $file:literal)),* $(,)?) => {
        vec![$(
            Migration::new(
                $version,
                $name.into(),
                MigrationType::Simple,
                include_str!(concat!("../", $dir, "/", $file)).into_sql_str(),
                false,
            ),
        )*]
    };
}

/// Migrations for PostgreSQL.
pub fn postgres() -> Migrator {
    Migrator::with_migrations(migrations!("postgres":
        (1, "initial", "0001_initial.sql"),
        (2, "reports", "0002_reports.sql"),
        (3, "broadcast_public", "0003_broadcast_public.sql"),
        (4, "runs_and_node_credentials", "0004_runs_and_node_credentials.sql"),
    ))
}

/// Migrations for SQLite.
pub fn sqlite() -> Migrator {
    Migrator::with_migrations(migrations!("sqlite":
        (1, "initial", "0001_initial.sql"),
        (2, "reports", "0002_reports.sql"),
        (3, "broadcast_public", "0003_broadcast_public.sql"),
        (4, "runs_and_node_credentials", "0004_runs_and_node_credentials.sql"),
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn both_backends_have_the_same_versions() {
        let pg: Vec<i64> = super::postgres().iter().map(|m| m.version).collect();
        let lite: Vec<i64> = super::sqlite().iter().map(|m| m.version).collect();
        assert_eq!(pg, lite);
        assert!(!pg.is_empty());
    }
}

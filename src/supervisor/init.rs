//! `cyber-inference init` (also run by `serve` when anything is missing): creates DATA_DIR, MODELS_DIR
//! and DATA_DIR/logs, the database, the JWT secret (a random 256-bit key in DATA_DIR/jwt_secret, mode
//! 0600, unless JWT_SECRET is set) and the `admin` user (password from ADMIN_PASSWORD, else generated
//! and printed once).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;

use crate::config::Settings;

use super::auth::{ADMIN_USER, generate_password, hash_password, verify_password};
use super::db::Db;
use super::error::ServeError;

/// File name of the database inside DATA_DIR.
pub const DB_FILE: &str = "cyber-inference.db";
/// File name of the JWT secret inside DATA_DIR.
pub const SECRET_FILE: &str = "jwt_secret";

/// What init produced.
pub struct Initialized {
    pub db: Db,
    /// The JWT signing secret.
    pub secret: Vec<u8>,
    /// A password generated for `admin` now (to be printed once), if one was.
    pub generated_password: Option<String>,
    pub db_path: PathBuf,
}

fn mkdir(what: &'static str, p: &Path) -> Result<(), ServeError> {
    std::fs::create_dir_all(p).map_err(|source| ServeError::Io {
        what,
        path: p.display().to_string(),
        source,
    })
}

/// Creates `p` (and missing parents) with mode 0700: DATA_DIR holds the database (password hash, API key
/// hashes, request log), the JWT secret and the logs. An existing folder readable by others gets 0700 with a
/// warning.
fn mkdir_private(what: &'static str, p: &Path) -> Result<(), ServeError> {
    let io = |source| ServeError::Io {
        what,
        path: p.display().to_string(),
        source,
    };
    if let Some(parent) = p.parent().filter(|q| !q.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && p.is_dir() => {
            let mode = std::fs::metadata(p).map_err(io)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %p.display(), "data folder is open to other users (mode {:o}); setting 0700", mode & 0o777);
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
            }
            Ok(())
        }
        Err(e) => Err(io(e)),
    }
}

/// Reads DATA_DIR/jwt_secret, creating it (0600, 32 random bytes as hex) when missing.
///
/// Errors: [`ServeError::Io`] when it cannot be written, [`ServeError::Secret`] for a file that is not
/// at least 32 bytes of hex.
pub fn load_or_create_secret(data_dir: &Path) -> Result<Vec<u8>, ServeError> {
    let path = data_dir.join(SECRET_FILE);
    let io = |source| ServeError::Io {
        what: "JWT secret file",
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let bytes = hex::decode(text.trim()).map_err(|e| ServeError::Secret {
                path: path.display().to_string(),
                reason: format!("not hex: {e}"),
            })?;
            if bytes.len() < 32 {
                return Err(ServeError::Secret {
                    path: path.display().to_string(),
                    reason: format!("{} bytes, at least 32 needed", bytes.len()),
                });
            }
            if let Ok(m) = std::fs::metadata(&path)
                && m.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(path = %path.display(), "JWT secret file is readable by others; setting mode 0600");
                let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
            }
            Ok(bytes)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut b = [0u8; 32];
            rand::rng().fill_bytes(&mut b);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(io)?;
            f.write_all(hex::encode(b).as_bytes()).map_err(io)?;
            Ok(b.to_vec())
        }
        Err(e) => Err(io(e)),
    }
}

/// Runs every init step that is still missing; idempotent. When ADMIN_PASSWORD is set and does not
/// match the stored hash, the hash is replaced (the environment is the source of truth).
///
/// Errors: [`ServeError`] naming the folder, file or database that failed.
pub async fn run(s: &Settings) -> Result<Initialized, ServeError> {
    mkdir_private("data folder", &s.data_dir)?;
    mkdir("models folder", &s.models_dir)?;
    mkdir("log folder", &s.data_dir.join("logs"))?;
    let db_path = s.data_dir.join(DB_FILE);
    let db = Db::open(&db_path).await?;
    let secret = match &s.jwt_secret {
        Some(k) => k.as_bytes().to_vec(),
        None => load_or_create_secret(&s.data_dir)?,
    };
    let mut generated_password = None;
    match (db.get_user(ADMIN_USER).await?, &s.admin_password) {
        (None, pw) => {
            let pw = match pw {
                Some(p) => p.clone(),
                None => {
                    let p = generate_password();
                    generated_password = Some(p.clone());
                    p
                }
            };
            let h = tokio::task::spawn_blocking(move || hash_password(&pw))
                .await
                .map_err(|e| ServeError::Other(e.to_string()))??;
            db.upsert_user(ADMIN_USER, &h).await?;
        }
        (Some(u), Some(pw)) => {
            let (pw, hash) = (pw.clone(), u.password_hash.clone());
            let h = tokio::task::spawn_blocking(move || {
                (!verify_password(&pw, &hash)).then(|| hash_password(&pw))
            })
            .await
            .map_err(|e| ServeError::Other(e.to_string()))?;
            if let Some(h) = h {
                db.upsert_user(ADMIN_USER, &h?).await?;
                // A new password ends the sessions made with the old one.
                db.bump_token_version(ADMIN_USER).await?;
                tracing::info!("admin password updated from CYBER_INFERENCE_ADMIN_PASSWORD");
            }
        }
        (Some(_), None) => {}
    }
    Ok(Initialized {
        db,
        secret,
        generated_password,
        db_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn init_is_idempotent_and_the_secret_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let s = Settings {
            data_dir: dir.path().join("data"),
            models_dir: dir.path().join("models"),
            ..Settings::default()
        };
        let a = run(&s).await.unwrap();
        let pw = a
            .generated_password
            .clone()
            .expect("generated on first init");
        let mode = std::fs::metadata(s.data_dir.join(SECRET_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(a.secret.len(), 32);
        let u = a.db.get_user(ADMIN_USER).await.unwrap().unwrap();
        assert!(verify_password(&pw, &u.password_hash));
        a.db.close().await;
        let b = run(&s).await.unwrap();
        assert!(b.generated_password.is_none(), "printed once only");
        assert_eq!(a.secret, b.secret);
        b.db.close().await;
        // ADMIN_PASSWORD replaces the hash; JWT_SECRET replaces the file's key.
        let s2 = Settings {
            admin_password: Some("new-pass".into()),
            jwt_secret: Some("env-secret".into()),
            ..s.clone()
        };
        let c = run(&s2).await.unwrap();
        assert_eq!(c.secret, b"env-secret");
        let u = c.db.get_user(ADMIN_USER).await.unwrap().unwrap();
        assert!(verify_password("new-pass", &u.password_hash));
        std::fs::write(s.data_dir.join(SECRET_FILE), "zz").unwrap();
        assert!(matches!(
            load_or_create_secret(&s.data_dir),
            Err(ServeError::Secret { .. })
        ));
    }
}

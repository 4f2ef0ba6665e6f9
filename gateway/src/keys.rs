//! The public-key files RS256 and ES256 tokens are checked against
//! (`--jwt-public-key`, `--jwt-jwks`), and their reload on SIGHUP.
//!
//! The keys themselves are parsed by the router (`auth::KeySet`); this module
//! reads the files. A reload reads both again and swaps the whole set for
//! every shard at once; if a file is missing or broken, the old keys stay
//! and the error is returned for the log.

use std::path::{Path, PathBuf};

use crate::auth::{KeySet, Keys};

/// Where the keys come from, and the handle every shard's verifier reads.
#[derive(Debug, Clone)]
pub struct KeyFiles {
    public_key: Option<PathBuf>,
    jwks: Option<PathBuf>,
    keys: Keys,
}

impl KeyFiles {
    /// Reads the files; `None` when neither is configured. An error names the
    /// flag, the file and what is wrong with it.
    pub fn load(
        public_key: Option<&Path>,
        jwks: Option<&Path>,
    ) -> Result<Option<KeyFiles>, String> {
        if public_key.is_none() && jwks.is_none() {
            return Ok(None);
        }
        let mut files = KeyFiles {
            public_key: public_key.map(Path::to_path_buf),
            jwks: jwks.map(Path::to_path_buf),
            keys: Keys::new(KeySet::default()),
        };
        let set = files.read()?;
        files.keys = Keys::new(set);
        Ok(Some(files))
    }

    /// How many keys are in use.
    pub fn count(&self) -> usize {
        self.keys.current().keys.len()
    }

    /// The handle verifiers share.
    pub fn keys(&self) -> Keys {
        self.keys.clone()
    }

    /// Reads the files again and, if both read cleanly, replaces the keys:
    /// new tokens are checked against the new set at once. Returns how many
    /// keys are now in use; on an error the old ones stay.
    pub fn reload(&self) -> Result<usize, String> {
        let set = self.read()?;
        let n = set.keys.len();
        self.keys.replace(set);
        Ok(n)
    }

    fn read(&self) -> Result<KeySet, String> {
        let mut keys = Vec::new();
        if let Some(path) = &self.public_key {
            let text = read(path, "--jwt-public-key")?;
            let set = KeySet::from_pem(&text)
                .map_err(|e| format!("--jwt-public-key {}: {e}", path.display()))?;
            keys.extend(set.keys);
        }
        if let Some(path) = &self.jwks {
            let text = read(path, "--jwt-jwks")?;
            let (set, skipped) = KeySet::from_jwks(&text)
                .map_err(|e| format!("--jwt-jwks {}: {e}", path.display()))?;
            for s in skipped {
                log::info!("--jwt-jwks {}: skipped {s}", path.display());
            }
            keys.extend(set.keys);
        }
        Ok(KeySet { keys })
    }
}

fn read(path: &Path, flag: &str) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map_err(|e| format!("{flag} {}: cannot read it: {e}", path.display()))
}

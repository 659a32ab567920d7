//! Where tables live: one object store and a base URL inside it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, LazyLock};

use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{DynObjectStore, ObjectStore};
use parking_lot::Mutex;
use url::Url;

use crate::{Error, Result};

/// Named in-memory stores live as long as the process, so a test can reopen Tally on
/// `memory://name/` and see what it wrote before, as it would after a restart on disk.
static MEMORY_STORES: LazyLock<Mutex<HashMap<String, Arc<InMemory>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

#[derive(Debug, Clone)]
pub struct Location {
    /// The store with "/" at its root (filesystem root, bucket root, ...), as Delta wants it.
    store: Arc<DynObjectStore>,
    /// URL of the folder holding the tables, ending in '/'.
    base_url: Url,
    /// The same folder as a path inside `store`.
    base_path: Path,
    /// Set for local storage: the absolute directory.
    local_dir: Option<PathBuf>,
}

impl Location {
    pub fn parse(raw: &str, options: &BTreeMap<String, String>) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidLocation {
            url: raw.to_string(),
            reason,
        };
        let raw = raw.trim();
        if !raw.contains("://") {
            return Self::local(PathBuf::from(raw), raw);
        }
        let url = Url::parse(raw).map_err(|e| invalid(e.to_string()))?;
        match url.scheme() {
            "file" => {
                let path = url
                    .to_file_path()
                    .map_err(|()| invalid("not a local path".into()))?;
                Self::local(path, raw)
            }
            "memory" => {
                let name = url.host_str().unwrap_or("default").to_string();
                let store = Arc::clone(
                    MEMORY_STORES
                        .lock()
                        .entry(name.clone())
                        .or_insert_with(|| Arc::new(InMemory::new())),
                );
                let base_url = with_trailing_slash(url);
                let base_path = Path::from(base_url.path());
                Ok(Self {
                    store,
                    base_url,
                    base_path,
                    local_dir: None,
                })
            }
            "s3" | "s3a" | "gs" | "az" | "abfs" | "abfss" | "adl" | "azure" | "https" => {
                let opts: Vec<(String, String)> = options
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let (store, base_path) =
                    object_store::parse_url_opts(&url, opts).map_err(|e| invalid(e.to_string()))?;
                Ok(Self {
                    store: Arc::from(store),
                    base_url: with_trailing_slash(url),
                    base_path,
                    local_dir: None,
                })
            }
            other => Err(invalid(format!(
                "unsupported scheme '{other}' (use a path, file://, s3://, gs://, az:// or memory://)"
            ))),
        }
    }

    fn local(path: PathBuf, raw: &str) -> Result<Self> {
        std::fs::create_dir_all(&path).map_err(|e| Error::InvalidLocation {
            url: raw.to_string(),
            reason: format!("cannot create directory: {e}"),
        })?;
        let abs = std::fs::canonicalize(&path).map_err(|e| Error::InvalidLocation {
            url: raw.to_string(),
            reason: e.to_string(),
        })?;
        let base_url = Url::from_directory_path(&abs).map_err(|()| Error::InvalidLocation {
            url: raw.to_string(),
            reason: "not an absolute path".into(),
        })?;
        let base_path = Path::from_absolute_path(&abs).map_err(|e| Error::InvalidLocation {
            url: raw.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            store: Arc::new(LocalFileSystem::new()),
            base_url,
            base_path,
            local_dir: Some(abs),
        })
    }

    pub fn store(&self) -> &Arc<DynObjectStore> {
        &self.store
    }

    pub fn url(&self) -> &Url {
        &self.base_url
    }

    pub fn local_dir(&self) -> Option<&PathBuf> {
        self.local_dir.as_ref()
    }

    /// URL of a table's folder.
    pub fn table_url(&self, name: &str) -> Result<Url> {
        self.base_url
            .join(&format!("{name}/"))
            .map_err(|e| Error::InvalidLocation {
                url: self.base_url.to_string(),
                reason: e.to_string(),
            })
    }

    /// A table's folder as a path inside [`Self::store`].
    pub fn table_path(&self, name: &str) -> Path {
        self.base_path.clone().join(name)
    }

    /// Where the state document `name` lives: beside the tables, in a folder that is not one.
    pub fn state_path(&self, name: &str) -> Path {
        self.base_path.clone().join("_tally_state").join(name)
    }

    /// Folders under the base that hold a `_delta_log`.
    pub async fn list_tables(&self) -> Result<Vec<String>> {
        let listing = self
            .store
            .list_with_delimiter(Some(&self.base_path))
            .await?;
        let mut names = Vec::new();
        for prefix in listing.common_prefixes {
            let Some(name) = prefix.filename() else {
                continue;
            };
            let log = prefix.clone().join("_delta_log");
            let inner = self.store.list_with_delimiter(Some(&log)).await?;
            if !inner.objects.is_empty() {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    /// One cheap request that proves the store answers.
    pub async fn probe(&self) -> Result<()> {
        self.store
            .list_with_delimiter(Some(&self.base_path))
            .await?;
        Ok(())
    }
}

fn with_trailing_slash(mut url: Url) -> Url {
    if !url.path().ends_with('/') {
        let p = format!("{}/", url.path());
        url.set_path(&p);
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_locations() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::parse(dir.path().to_str().unwrap(), &BTreeMap::new()).unwrap();
        assert_eq!(loc.url().scheme(), "file");
        assert!(loc.url().path().ends_with('/'));
        assert!(loc.local_dir().is_some());

        let mem = Location::parse("memory://unit/base", &BTreeMap::new()).unwrap();
        assert_eq!(
            mem.table_url("metrics").unwrap().as_str(),
            "memory://unit/base/metrics/"
        );

        let err = Location::parse("ftp://x/y", &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("unsupported scheme"), "{err}");
    }

    #[test]
    fn parses_cloud_urls_without_network() {
        let opts: BTreeMap<String, String> =
            [("aws_region".to_string(), "us-east-1".to_string())].into();
        let s3 = Location::parse("s3://bucket/tally", &opts).unwrap();
        assert_eq!(
            s3.table_url("metrics").unwrap().as_str(),
            "s3://bucket/tally/metrics/"
        );
    }
}

//! Versions in shared storage (fleet mode, `lethe serve --versions-url`): every version
//! directory, content-addressed, in an object store (a shared directory as `file:///…`, S3 and
//! GCS, through the `object_store` crate), and each replica's local copy under
//! `data_dir/versions/` as a cache.
//!
//! Invariants:
//! - Version `<id>` is stored as `<prefix>/<id>/<file>` for every file of its directory, then
//!   `<prefix>/<id>/MANIFEST.json` (each file's name, size and sha256), written **last**: a
//!   version without its manifest is incomplete and is never read. A version whose manifest
//!   exists is never written again (the id is its content hash, so its content cannot differ).
//! - [`SharedVersions::fetch`] downloads into a `.tmp-*` directory, checks every file's size
//!   and sha256 against the manifest and the directory's content hash against `<id>`, then
//!   publishes it under `data_dir/versions/<id>` by one rename, as a locally written version.
//!   A corrupt or truncated object is an error naming the file and changes nothing.
//! - Files stream in chunks both ways: memory does not grow with the size of the weights.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{fsync_dir, new_tmp, publish, version_dir};
use crate::takedown::{Error, Result};

/// The object naming a complete version.
pub const MANIFEST: &str = "MANIFEST.json";
/// Upload and download chunk size.
const CHUNK: usize = 8 << 20;

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    id: String,
    files: Vec<ManifestFile>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ManifestFile {
    name: String,
    bytes: u64,
    sha256: String,
}

/// The shared version store of a fleet.
pub struct SharedVersions {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    url: String,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for SharedVersions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedVersions({})", self.url)
    }
}

fn remote_err(
    op: &'static str,
    what: impl std::fmt::Display,
) -> impl FnOnce(object_store::Error) -> Error {
    let what = what.to_string();
    move |e| Error::Remote {
        op,
        message: format!("{what}: {e}"),
    }
}

impl SharedVersions {
    /// Opens the store at `url`: `file:///absolute/dir` (created if missing),
    /// `s3://bucket/prefix` (any S3-compatible service) or `gs://bucket/prefix` (Google Cloud
    /// Storage), with its settings and credentials from the environment (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT` for a service other than AWS,
    /// `AWS_ALLOW_HTTP`, …; `GOOGLE_SERVICE_ACCOUNT`, `GOOGLE_BUCKET`, …).
    pub fn open(url: &str) -> Result<SharedVersions> {
        Self::open_with(url, std::env::vars())
    }

    /// [`SharedVersions::open`] with the settings given as `(key, value)` pairs (the
    /// `object_store` crate's configuration keys, e.g. `aws_endpoint`; case does not matter,
    /// unknown keys are ignored) instead of the environment.
    pub fn open_with(
        url: &str,
        options: impl IntoIterator<Item = (String, String)>,
    ) -> Result<SharedVersions> {
        let parsed = url::Url::parse(url)
            .map_err(|e| Error::invalid("--versions-url", format!("{url:?}: {e}")))?;
        if parsed.scheme() == "file" {
            let dir = parsed.to_file_path().map_err(|_| {
                Error::invalid("--versions-url", format!("{url:?} is not a local path"))
            })?;
            std::fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
        }
        let (store, prefix) = object_store::parse_url_opts(&parsed, options)
            .map_err(|e| Error::invalid("--versions-url", format!("{url:?}: {e}")))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::io("start the object-store runtime for", url))?;
        Ok(SharedVersions {
            store: Arc::from(store),
            prefix,
            url: url.to_string(),
            rt,
        })
    }

    /// The URL it was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn object(&self, id: &str, file: &str) -> ObjectPath {
        self.prefix.clone().join(id).join(file)
    }

    /// Whether version `id` is complete in the store (its manifest exists).
    pub fn contains(&self, id: &str) -> Result<bool> {
        let path = self.object(id, MANIFEST);
        match self.rt.block_on(self.store.head(&path)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(remote_err("look up", &path)(e)),
        }
    }

    /// Uploads the version directory `dir` as `id`, manifest last. Returns false when the
    /// store already holds it (nothing is written).
    pub fn upload(&self, id: &str, dir: &Path) -> Result<bool> {
        if self.contains(id)? {
            return Ok(false);
        }
        let mut files = Vec::new();
        for (name, path) in super::top_files(dir)? {
            let (bytes, sha256) = self
                .rt
                .block_on(self.put_file(&path, &self.object(id, &name)))?;
            files.push(ManifestFile {
                name,
                bytes,
                sha256,
            });
        }
        let manifest = serde_json::to_vec_pretty(&Manifest {
            id: id.to_string(),
            files,
        })
        .map_err(|e| Error::invalid("manifest", e.to_string()))?;
        let path = self.object(id, MANIFEST);
        self.rt
            .block_on(self.store.put(&path, manifest.into()))
            .map_err(remote_err("write", &path))?;
        Ok(true)
    }

    async fn put_file(&self, src: &Path, dst: &ObjectPath) -> Result<(u64, String)> {
        let mut f = std::fs::File::open(src).map_err(Error::io("open", src))?;
        let upload = self
            .store
            .put_multipart(dst)
            .await
            .map_err(remote_err("start upload of", dst))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, CHUNK);
        let mut buf = vec![0u8; CHUNK];
        let (mut total, mut h) = (0u64, Sha256::new());
        loop {
            let n = f.read(&mut buf).map_err(Error::io("read", src))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            total += n as u64;
            w.wait_for_capacity(2)
                .await
                .map_err(remote_err("upload", dst))?;
            w.write(&buf[..n]);
        }
        w.finish()
            .await
            .map_err(remote_err("finish upload of", dst))?;
        Ok((total, crate::util::hex(&h.finalize())))
    }

    /// The local directory of version `id`: the cached copy under `data_dir/versions/<id>`, or
    /// else a verified download from the store (module docs).
    pub fn fetch(&self, data_dir: &Path, id: &str) -> Result<PathBuf> {
        let local = version_dir(data_dir, id);
        if local.is_dir() {
            return Ok(local);
        }
        let mpath = self.object(id, MANIFEST);
        let raw = self
            .rt
            .block_on(async { self.store.get(&mpath).await?.bytes().await })
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => Error::VersionNotFound(format!(
                    "{id} (not in the shared version store {})",
                    self.url
                )),
                e => remote_err("read", &mpath)(e),
            })?;
        let manifest: Manifest = serde_json::from_slice(&raw).map_err(|e| Error::Corrupt {
            what: mpath.to_string(),
            message: e.to_string(),
        })?;
        if manifest.id != id {
            return Err(Error::Corrupt {
                what: mpath.to_string(),
                message: format!("it describes version {}, not {id}", manifest.id),
            });
        }
        let tmp = new_tmp(data_dir)?;
        let fetched = (|| {
            for f in &manifest.files {
                if f.name.is_empty() || f.name.contains(['/', '\\']) || f.name.starts_with('.') {
                    return Err(Error::Corrupt {
                        what: mpath.to_string(),
                        message: format!("file name {:?} is not a plain file name", f.name),
                    });
                }
                self.rt.block_on(self.get_file(
                    &self.object(id, &f.name),
                    &tmp.join(&f.name),
                    f,
                ))?;
            }
            fsync_dir(&tmp)
        })();
        if let Err(e) = fetched {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let (got, dir) = publish(data_dir, &tmp, Some(id))?;
        debug_assert_eq!(got, id);
        Ok(dir)
    }

    async fn get_file(&self, src: &ObjectPath, dst: &Path, want: &ManifestFile) -> Result<()> {
        let mut out = std::fs::File::create(dst).map_err(Error::io("create", dst))?;
        let mut stream = self
            .store
            .get(src)
            .await
            .map_err(remote_err("read", src))?
            .into_stream();
        let (mut total, mut h) = (0u64, Sha256::new());
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(remote_err("read", src))?;
            h.update(&chunk);
            total += chunk.len() as u64;
            out.write_all(&chunk).map_err(Error::io("write", dst))?;
        }
        out.sync_all().map_err(Error::io("fsync", dst))?;
        let sha = crate::util::hex(&h.finalize());
        if total != want.bytes || sha != want.sha256 {
            return Err(Error::Corrupt {
                what: src.to_string(),
                message: format!(
                    "{total} bytes with sha256 {sha}; the manifest says {} bytes with sha256 {}",
                    want.bytes, want.sha256
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tinymem-noise")
    }

    /// Uploads the bundled base model's version to `remote` (a second upload writes nothing),
    /// fetches it into another replica's cache (same content hash, same files) and checks that
    /// an unknown version is `VersionNotFound`. Returns the version's id.
    fn round_trip(remote: &SharedVersions) -> String {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (id, dir) = super::super::import_base(a.path(), &base()).unwrap();
        assert!(!remote.contains(&id).unwrap());
        assert!(remote.upload(&id, &dir).unwrap());
        assert!(
            !remote.upload(&id, &dir).unwrap(),
            "a second upload writes nothing"
        );
        assert!(remote.contains(&id).unwrap());
        let got = remote.fetch(b.path(), &id).unwrap();
        assert_eq!(got, version_dir(b.path(), &id));
        assert_eq!(crate::loader::content_hash(&got).unwrap(), id);
        for (name, path) in super::super::top_files(&dir).unwrap() {
            assert_eq!(
                std::fs::read(&path).unwrap(),
                std::fs::read(got.join(&name)).unwrap()
            );
        }
        let missing = remote.fetch(b.path(), "0000000000000000").unwrap_err();
        assert!(matches!(missing, Error::VersionNotFound(_)), "{missing}");
        id
    }

    #[test]
    fn a_version_round_trips_through_a_shared_directory_and_corruption_is_refused() {
        let shared = tempfile::tempdir().unwrap();
        let url = format!("file://{}", shared.path().join("versions").display());
        let remote = SharedVersions::open(&url).unwrap();
        let id = round_trip(&remote);
        // A flipped byte in the stored weights fails the sha256 check and leaves no directory.
        let c = tempfile::tempdir().unwrap();
        let stored = shared
            .path()
            .join("versions")
            .join(&id)
            .join("model.safetensors");
        let mut bytes = std::fs::read(&stored).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&stored, bytes).unwrap();
        let err = remote.fetch(c.path(), &id).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("sha256"),
            "{err}"
        );
        assert!(!version_dir(c.path(), &id).exists());
        let left: Vec<_> = std::fs::read_dir(super::super::versions_dir(c.path()))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "the temporary download is removed");
    }

    /// An S3-compatible server for the test: moto's (`scripts/s3/requirements.txt`), from
    /// `LETHE_MOTO_SERVER` or `target/moto-venv`. `None` (the test prints that it skipped) when
    /// it is missing, unless `LETHE_REQUIRE_S3` is set, as `.ci/run` sets it.
    struct Moto(std::process::Child, u16);

    impl Drop for Moto {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn moto() -> Option<Moto> {
        let bin = std::env::var("LETHE_MOTO_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("target/moto-venv/bin/moto_server")
            });
        if !bin.exists() {
            assert!(
                std::env::var_os("LETHE_REQUIRE_S3").is_none(),
                "LETHE_REQUIRE_S3 is set but {} is missing (pip install -r scripts/s3/requirements.txt)",
                bin.display()
            );
            eprintln!(
                "skipped: no S3-compatible server ({} missing)",
                bin.display()
            );
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let moto = Moto(child, port);
        // Ready when it answers; then create the bucket (PUT /bucket).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                write!(
                    s,
                    "PUT /lethe-versions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
                     Content-Length: 0\r\nConnection: close\r\n\r\n"
                )
                .unwrap();
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                if out.starts_with("HTTP/1.1 200") {
                    return Some(moto);
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "moto_server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    #[test]
    fn a_version_round_trips_through_an_s3_compatible_store() {
        let Some(server) = moto() else {
            return;
        };
        let options = [
            ("aws_endpoint", format!("http://127.0.0.1:{}", server.1)),
            ("aws_allow_http", "true".into()),
            ("aws_access_key_id", "test".into()),
            ("aws_secret_access_key", "test".into()),
            ("aws_region", "us-east-1".into()),
        ]
        .map(|(k, v)| (k.to_string(), v));
        let remote = SharedVersions::open_with("s3://lethe-versions/fleet", options).unwrap();
        round_trip(&remote);
    }

    #[test]
    fn a_bad_url_is_an_error_naming_the_flag() {
        let e = SharedVersions::open("not a url").unwrap_err().to_string();
        assert!(e.contains("--versions-url"), "{e}");
        let e = SharedVersions::open("ftp://host/dir")
            .unwrap_err()
            .to_string();
        assert!(e.contains("--versions-url"), "{e}");
    }
}

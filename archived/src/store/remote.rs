//! Remote backends (`s3://`, `gs://`, `az://`) through object_store.
//!
//! # Writes
//!
//! The body is spooled to a local temporary file while it is received and verified, then
//! uploaded create-only; success is the backend's acknowledgement. An object up to
//! [`SINGLE_PUT_MAX`] is one PUT with `PutMode::Create` (`If-None-Match: *` on S3). A
//! larger one streams from the spool file as a multipart upload to a temporary key under
//! [`UPLOADS_PREFIX`] and is then copied to its name with `copy_if_not_exists` (on S3 a
//! one-part multipart copy completed with `If-None-Match: *`), because object_store's
//! multipart uploads cannot be create-only themselves (arrow-rs-object-store#289); the
//! temporary key is deleted after the copy, and at startup if a crash left it behind.
//!
//! # Configuration
//!
//! `s3://`, `gs://` and `az://` builders start from the environment (`AWS_*`,
//! `GOOGLE_*`, `AZURE_*`: e.g. `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ALLOW_HTTP`), then `[storage_options]` of
//! archived.toml overrides them. An option the backend does not know is refused at
//! startup (object_store's own URL parser would silently ignore a misspelt key). On S3,
//! `aws_copy_if_not_exists` defaults to `multipart`, which the streaming path needs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, S3CopyIfNotExists};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::{
    path::Path as ObjPath, ObjectStore, ObjectStoreScheme, PutMode, PutOptions, PutPayload,
    WriteMultipart,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use walvault_protocol::net::fsutil;

use super::layout::UPLOADS_PREFIX;
use super::object::{CreateOutcome, Loc, Many, ObjectHeader, PendingObject, HEADER_LEN};

/// Remote objects up to this size (header included) are uploaded in one PUT, read whole
/// into memory; larger ones stream as multipart uploads (see the module header).
pub(crate) const SINGLE_PUT_MAX: u64 = 16 << 20;
/// Part size of streamed uploads.
const PART_SIZE: usize = 8 << 20;
/// Parts uploaded at once per streamed object: a large upload holds at most
/// (PARTS_IN_FLIGHT + 1) x PART_SIZE = 40 MiB, whatever the object's size.
const PARTS_IN_FLIGHT: usize = 4;
/// What a streamed upload holds: the parts in flight, the one being filled, and the
/// read buffer of the spool file.
const STREAMED_UPLOAD_MEMORY: u64 = ((PARTS_IN_FLIGHT + 1) * PART_SIZE + (1 << 20)) as u64;
/// What a body stream holds at most while its answer is sent: the HTTP client's read
/// buffers and the piece in hand.
pub(super) const BODY_STREAM_MEMORY: u64 = 1 << 20;

/// Bytes the commit of an object of `len` bytes holds (see [`RemoteStore::commit`]).
pub(super) fn commit_memory(len: u64) -> u64 {
    if len <= SINGLE_PUT_MAX {
        len
    } else {
        STREAMED_UPLOAD_MEMORY
    }
}

/// Temporary upload keys older than this are removed at startup (a crash mid-upload).
const STALE_UPLOAD_SECS: i64 = 3600;

/// A store in an object_store backend.
#[derive(Clone)]
pub(crate) struct RemoteStore {
    store: Arc<dyn ObjectStore>,
    /// Description for logs.
    url: String,
    /// Local directory for spooling uploads.
    spool: PathBuf,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl RemoteStore {
    /// The backend named by `url` with `options`, spooling uploads in `spool`.
    pub(super) fn open(
        url: &str,
        options: &[(String, String)],
        spool: &Path,
    ) -> Result<RemoteStore> {
        let parsed =
            url::Url::parse(url).with_context(|| format!("invalid storage URL '{url}'"))?;
        let (store, prefix) = remote_backend(&parsed, options)
            .with_context(|| format!("unsupported or misconfigured storage URL '{url}'"))?;
        let store: Arc<dyn ObjectStore> = if prefix.as_ref().is_empty() {
            Arc::from(store)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
        };
        walvault_protocol::net::fsutil::create_dir_durable(spool)
            .with_context(|| format!("cannot create spool directory {}", spool.display()))?;
        Ok(RemoteStore {
            store,
            url: url.to_string(),
            spool: spool.to_path_buf(),
        })
    }

    /// Over any object_store (tests: `InMemory`), spooling in `spool`.
    #[cfg(test)]
    pub(crate) fn with_backend(
        store: Arc<dyn ObjectStore>,
        url: &str,
        spool: &Path,
    ) -> RemoteStore {
        RemoteStore {
            store,
            url: url.to_string(),
            spool: spool.to_path_buf(),
        }
    }

    pub(super) fn url(&self) -> &str {
        &self.url
    }

    pub(super) fn spool(&self) -> &Path {
        &self.spool
    }

    pub(super) fn temp_path(&self, key: &str) -> PathBuf {
        fsutil::temp_path_beside(&self.spool.join(key.replace('/', "_")))
    }

    pub(super) async fn commit(&self, pending: &mut PendingObject) -> Result<CreateOutcome> {
        let size = pending.reserved + pending.written;
        if size <= SINGLE_PUT_MAX {
            let bytes = tokio::fs::read(&pending.tmp).await?;
            return self.put_new(&pending.key, bytes.into()).await;
        }
        let name = pending
            .tmp
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let upload_key = format!(
            "{UPLOADS_PREFIX}{}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
            name.trim_start_matches('.')
        );
        stream_create(
            self.store.as_ref(),
            &mut pending.file,
            &upload_key,
            &pending.key,
        )
        .await
    }

    pub(super) async fn put_new(&self, key: &str, bytes: Bytes) -> Result<CreateOutcome> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&ObjPath::from(key), PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => Ok(CreateOutcome::Created),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(CreateOutcome::Exists),
            Err(e) => Err(anyhow!(e).context(format!("cannot store {key}"))),
        }
    }

    pub(super) async fn get_small(&self, key: &str) -> Result<Option<Bytes>> {
        match self.store.get(&ObjPath::from(key)).await {
            Ok(r) => Ok(Some(r.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(anyhow!(e).context(format!("cannot read {key}"))),
        }
    }

    /// Eight ranged GETs at a time, every object in memory before the stream starts.
    pub(super) async fn get_many(&self, locs: Vec<Loc>) -> Result<Many> {
        let mut objects = Vec::with_capacity(locs.len());
        for group in locs.chunks(8) {
            let mut gets = Vec::with_capacity(group.len());
            for l in group {
                gets.push(async move {
                    match &l.range {
                        None => self.get_small(&l.key).await,
                        Some(r) => self.get_range(&l.key, r.clone()).await,
                    }
                });
            }
            for got in futures::future::join_all(gets).await {
                match got? {
                    Some(b) => objects.push(Ok(b)),
                    None => return Ok(Many::Missing(objects.len())),
                }
            }
        }
        Ok(Many::Objects(futures::stream::iter(objects).boxed()))
    }

    pub(super) async fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Option<Bytes>> {
        match self.store.get_range(&ObjPath::from(key), range).await {
            Ok(b) => Ok(Some(b)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(anyhow!(e).context(format!("cannot read {key}"))),
        }
    }

    pub(super) async fn len(&self, key: &str) -> Result<Option<u64>> {
        match self.store.head(&ObjPath::from(key)).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(anyhow!(e).context(format!("cannot stat {key}"))),
        }
    }

    pub(super) async fn read_head(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match self
            .store
            .get_range(&ObjPath::from(key), 0..HEADER_LEN as u64)
            .await
        {
            Ok(b) => Ok(Some(b.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(anyhow!(e).context(format!("cannot read {key}"))),
        }
    }

    pub(super) async fn body_stream(
        &self,
        key: &str,
        header: &ObjectHeader,
    ) -> Result<BoxStream<'static, Result<Bytes>>> {
        let end = HEADER_LEN as u64 + header.compressed_size;
        let opts = object_store::GetOptions {
            range: Some((HEADER_LEN as u64..end).into()),
            ..Default::default()
        };
        let stream = self
            .store
            .get_opts(&ObjPath::from(key), opts)
            .await?
            .into_stream();
        Ok(stream.map(|r| r.map_err(anyhow::Error::from)).boxed())
    }

    /// Deletes the temporary keys of streamed uploads older than an hour.
    pub(super) async fn remove_stale_uploads(&self) -> Result<u64> {
        let now = unix_now();
        let mut stale = Vec::new();
        let mut listing = self.store.list(Some(&ObjPath::from(UPLOADS_PREFIX)));
        while let Some(meta) = listing.next().await {
            let meta = meta.context("listing temporary uploads")?;
            if now - meta.last_modified.timestamp() > STALE_UPLOAD_SECS {
                stale.push(meta.location);
            }
        }
        let mut removed = 0;
        for key in stale {
            match self.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => removed += 1,
                Err(e) => return Err(anyhow!(e).context(format!("cannot delete {key}"))),
            }
        }
        Ok(removed)
    }

    pub(super) async fn delete(&self, key: &str) -> Result<()> {
        match self.store.delete(&ObjPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(anyhow!(e).context(format!("cannot delete {key}"))),
        }
    }

    pub(super) async fn modified(&self, key: &str) -> Result<Option<i64>> {
        match self.store.head(&ObjPath::from(key)).await {
            Ok(meta) => Ok(Some(meta.last_modified.timestamp())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(anyhow!(e).context(format!("cannot stat {key}"))),
        }
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let p = if prefix.is_empty() {
            None
        } else {
            Some(ObjPath::from(prefix))
        };
        let mut stream = self.store.list(p.as_ref());
        let mut out = Vec::new();
        while let Some(meta) = stream.next().await {
            out.push(meta?.location.to_string());
        }
        out.sort();
        Ok(out)
    }
}

/// The object_store backend for a remote URL: the scheme's builder from the environment,
/// then `options` (refusing keys the backend does not know), and the path inside it.
fn remote_backend(
    url: &url::Url,
    options: &[(String, String)],
) -> Result<(Box<dyn ObjectStore>, ObjPath)> {
    let (scheme, path) = ObjectStoreScheme::parse(url)?;
    let unknown = |key: &str, scheme: &str| {
        anyhow!(
            "[storage_options] has '{key}', which the {scheme} backend does not know \
             (see README, \"Configuration\", for the keys)"
        )
    };
    let store: Box<dyn ObjectStore> = match scheme {
        ObjectStoreScheme::AmazonS3 => {
            let mut builder = AmazonS3Builder::from_env().with_url(url.as_str());
            for (key, value) in options {
                let k: AmazonS3ConfigKey = key.parse().map_err(|_| unknown(key, "S3"))?;
                builder = builder.with_config(k, value);
            }
            if builder
                .get_config_value(&AmazonS3ConfigKey::CopyIfNotExists)
                .is_none()
            {
                builder = builder.with_copy_if_not_exists(S3CopyIfNotExists::Multipart);
            }
            Box::new(builder.build()?)
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            let mut builder = GoogleCloudStorageBuilder::from_env().with_url(url.as_str());
            for (key, value) in options {
                let k: GoogleConfigKey = key.parse().map_err(|_| unknown(key, "GCS"))?;
                builder = builder.with_config(k, value);
            }
            Box::new(builder.build()?)
        }
        ObjectStoreScheme::MicrosoftAzure => {
            let mut builder = MicrosoftAzureBuilder::from_env().with_url(url.as_str());
            for (key, value) in options {
                let k: AzureConfigKey = key.parse().map_err(|_| unknown(key, "Azure"))?;
                builder = builder.with_config(k, value);
            }
            Box::new(builder.build()?)
        }
        _ => {
            bail!("only s3://, gs:// and az:// object stores (or a local directory) are supported")
        }
    };
    Ok((store, path))
}

/// Streams `file` (a finished spool file, header included) to `key` create-only: a
/// multipart upload to `upload_key`, then `copy_if_not_exists`, then the temporary key is
/// deleted. Memory: at most (PARTS_IN_FLIGHT + 1) x PART_SIZE.
async fn stream_create(
    store: &dyn ObjectStore,
    file: &mut tokio::fs::File,
    upload_key: &str,
    key: &str,
) -> Result<CreateOutcome> {
    let upload_path = ObjPath::from(upload_key);
    let upload = store
        .put_multipart(&upload_path)
        .await
        .with_context(|| format!("cannot start a multipart upload for {key}"))?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    file.seek(std::io::SeekFrom::Start(0)).await?;
    let mut buf = vec![0u8; 1 << 20];
    let sent: Result<()> = async {
        loop {
            let n = file
                .read(&mut buf)
                .await
                .context("reading the spool file")?;
            if n == 0 {
                return Ok(());
            }
            writer
                .wait_for_capacity(PARTS_IN_FLIGHT)
                .await
                .with_context(|| format!("uploading a part of {key}"))?;
            writer.write(&buf[..n]);
        }
    }
    .await;
    if let Err(e) = sent {
        let _ = writer.abort().await;
        return Err(e);
    }
    writer
        .finish()
        .await
        .with_context(|| format!("cannot complete the multipart upload of {key}"))?;
    let copied = store
        .copy_if_not_exists(&upload_path, &ObjPath::from(key))
        .await;
    // The temporary object is never read again, whatever the copy did.
    if let Err(e) = store.delete(&upload_path).await {
        tracing::warn!(key = %upload_key, error = %e, "cannot delete a temporary upload; it is removed at the next start");
    }
    match copied {
        Ok(()) => Ok(CreateOutcome::Created),
        Err(object_store::Error::AlreadyExists { .. }) => Ok(CreateOutcome::Exists),
        Err(e) => Err(anyhow!(e).context(format!("cannot store {key}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::super::Store;
    use super::*;

    #[test]
    fn object_store_urls_are_accepted_and_bad_ones_explained() {
        walvault_protocol::net::transport::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let opts = vec![
            ("aws_region".to_string(), "us-east-1".to_string()),
            ("aws_endpoint".to_string(), "http://127.0.0.1:9".to_string()),
            ("aws_access_key_id".to_string(), "test".to_string()),
            ("aws_secret_access_key".to_string(), "test".to_string()),
            ("aws_allow_http".to_string(), "true".to_string()),
        ];
        let store = Store::open(
            "s3://walvault-test/prefix",
            &opts,
            &dir.path().join("store"),
            &dir.path().join("spool"),
        )
        .unwrap();
        assert!(matches!(store, Store::Remote(_)));
        assert_eq!(store.describe(), "s3://walvault-test/prefix");
        let err = Store::open(
            "ftp://nowhere/x",
            &[],
            &dir.path().join("store"),
            &dir.path().join("spool"),
        )
        .err()
        .expect("ftp:// accepted");
        assert!(format!("{err:#}").contains("ftp://nowhere/x"), "{err:#}");
        let mut misspelt = opts.clone();
        misspelt.push(("aws_endpiont".to_string(), "http://x".to_string()));
        let err = Store::open(
            "s3://walvault-test/prefix",
            &misspelt,
            &dir.path().join("store"),
            &dir.path().join("spool"),
        )
        .err()
        .expect("a misspelt storage option was silently ignored");
        assert!(format!("{err:#}").contains("aws_endpiont"), "{err:#}");
    }

    /// An object above SINGLE_PUT_MAX goes through the streamed path: created once, a
    /// second (different) one under the name is `Exists` and changes nothing, and no
    /// temporary upload key is left behind.
    #[tokio::test]
    async fn large_remote_objects_stream_create_only() {
        let dir = tempfile::tempdir().unwrap();
        let memory: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let store = Store::Remote(RemoteStore::with_backend(
            Arc::new(object_store::prefix::PrefixStore::new(
                memory.clone(),
                "pre",
            )),
            "memory:///pre",
            dir.path(),
        ));
        let size = SINGLE_PUT_MAX as usize + 3 * PART_SIZE + 12345;
        let body: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let h = ObjectHeader {
            raw_size: 99,
            blake3: [3; 32],
            compressed_size: size as u64,
        };
        let key = "c/wal/00000001/big.zst";
        let mut p = store.begin(key).await.unwrap();
        for part in body.chunks(1 << 20) {
            p.write(part).await.unwrap();
        }
        assert_eq!(store.commit(p, &h).await.unwrap(), CreateOutcome::Created);
        let mut p = store.begin(key).await.unwrap();
        p.write(&body[..SINGLE_PUT_MAX as usize + 1]).await.unwrap();
        let other = ObjectHeader {
            blake3: [4; 32],
            compressed_size: SINGLE_PUT_MAX + 1,
            ..h.clone()
        };
        assert_eq!(
            store.commit(p, &other).await.unwrap(),
            CreateOutcome::Exists
        );
        assert_eq!(store.read_header(key).await.unwrap(), Some(h.clone()));
        let got: Vec<Bytes> = store
            .body_stream(key, &h)
            .await
            .unwrap()
            .map(|c| c.unwrap())
            .collect()
            .await;
        assert!(got.concat() == body, "the streamed object differs");
        let all: Vec<String> = memory
            .list(None)
            .map(|m| m.unwrap().location.to_string())
            .collect()
            .await;
        assert_eq!(
            all,
            vec![format!("pre/{key}")],
            "temporary uploads left behind"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

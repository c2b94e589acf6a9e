//! Blobs on an S3-compatible store, through `object_store` (SigV4, custom endpoints, path-style
//! or virtual-hosted addressing). Only three requests are ever made: a PUT of a whole blob, a
//! GET with a Range (an extent, or a blob's header and table), and a DELETE of a blob; never a
//! LIST, a multipart upload or a bulk delete (`with_disable_bulk_delete`). A test records what
//! the server saw to hold us to that.

use crate::blob::{self, BlobError, BlobId, ExtentBlocks, FetchedBlocks, Header, Placed, Table};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload, RetryConfig};
use std::time::Duration;

/// Where the blobs live and how to reach the store.
#[derive(Clone, Debug)]
pub struct S3Config {
    /// Endpoint URL ("http://127.0.0.1:9000"); `None`: AWS itself for the region.
    pub endpoint: Option<String>,
    /// Region (signing; "us-east-1" for most non-AWS stores).
    pub region: String,
    /// Bucket.
    pub bucket: String,
    /// Key prefix of this cluster's blobs ("" for none).
    pub prefix: String,
    /// Path-style addressing (`endpoint/bucket/key`) instead of virtual-hosted
    /// (`bucket.endpoint/key`).
    pub path_style: bool,
    /// Access key; `None`: `AWS_ACCESS_KEY_ID` from the environment.
    pub access_key: Option<String>,
    /// Secret key; `None`: `AWS_SECRET_ACCESS_KEY` from the environment.
    pub secret_key: Option<String>,
    /// How long one request may take.
    pub request_timeout_ms: u64,
    /// Sign the payload's SHA-256 (SigV4) instead of sending it as `UNSIGNED-PAYLOAD`: hashing
    /// a 64 MiB blob costs CPU, and every extent and the table carry their own CRC32C, checked
    /// on every read; stores behind plain HTTP proxies that must not alter bodies may want it.
    pub sign_payload: bool,
    /// Retries of one request by the client library (transient errors); the tier's own
    /// backoff and circuit breaker sit above this.
    pub retries: usize,
}

impl S3Config {
    /// A configuration for a store at `endpoint` (path-style, "us-east-1", plain HTTP allowed
    /// for a loopback test server).
    pub fn at(endpoint: &str, bucket: &str) -> S3Config {
        S3Config {
            endpoint: Some(endpoint.to_string()),
            region: "us-east-1".into(),
            bucket: bucket.to_string(),
            prefix: String::new(),
            path_style: true,
            access_key: None,
            secret_key: None,
            request_timeout_ms: 30_000,
            sign_payload: false,
            retries: 2,
        }
    }
}

/// What went wrong talking to the store, per operation.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// The configuration cannot make a client (missing credentials, bad endpoint).
    #[error("object store configuration: {0}")]
    Config(String),
    /// The store answered that the blob does not exist (loud: the index points at it).
    #[error("blob {key} is missing on the object store")]
    Missing {
        /// The blob's key.
        key: String,
    },
    /// A request failed (network, timeout, a 5xx after the client's retries, auth).
    #[error("{op} {key}: {source}")]
    Request {
        /// PUT, GET or DELETE.
        op: &'static str,
        /// The blob's key.
        key: String,
        /// What the client library said.
        source: object_store::Error,
    },
    /// The bytes came back wrong (truncated or corrupted) on every try.
    #[error("blob {key}: {source}")]
    Corrupt {
        /// The blob's key.
        key: String,
        /// What the check found.
        source: BlobError,
    },
}

/// Blobs on one bucket (see the module documentation).
pub struct BlobStore {
    s3: AmazonS3,
    prefix: String,
    /// Tries of a GET whose bytes fail their checksum (a truncated or corrupted response).
    get_tries: usize,
}

impl BlobStore {
    /// A client for `cfg` (no request is made).
    pub fn new(cfg: &S3Config) -> Result<BlobStore, S3Error> {
        let env = |k: &str| std::env::var(k).ok();
        let access = cfg
            .access_key
            .clone()
            .or_else(|| env("AWS_ACCESS_KEY_ID"))
            .ok_or_else(|| S3Error::Config("no access key (config or AWS_ACCESS_KEY_ID)".into()))?;
        let secret = cfg
            .secret_key
            .clone()
            .or_else(|| env("AWS_SECRET_ACCESS_KEY"))
            .ok_or_else(|| {
                S3Error::Config("no secret key (config or AWS_SECRET_ACCESS_KEY)".into())
            })?;
        let mut b = AmazonS3Builder::new()
            .with_region(&cfg.region)
            .with_bucket_name(&cfg.bucket)
            .with_access_key_id(access)
            .with_secret_access_key(secret)
            .with_virtual_hosted_style_request(!cfg.path_style)
            .with_disable_bulk_delete(true)
            .with_unsigned_payload(!cfg.sign_payload)
            .with_retry(RetryConfig {
                max_retries: cfg.retries,
                retry_timeout: Duration::from_millis(cfg.request_timeout_ms),
                ..RetryConfig::default()
            })
            .with_client_options(
                object_store::ClientOptions::new()
                    .with_timeout(Duration::from_millis(cfg.request_timeout_ms))
                    .with_allow_http(true),
            );
        if let Some(e) = &cfg.endpoint {
            b = b.with_endpoint(e);
        }
        if let Some(t) = env("AWS_SESSION_TOKEN") {
            b = b.with_token(t);
        }
        let s3 = b.build().map_err(|e| S3Error::Config(e.to_string()))?;
        Ok(BlobStore {
            s3,
            prefix: cfg.prefix.clone(),
            get_tries: 3,
        })
    }

    fn path(&self, id: BlobId) -> Path {
        Path::from(id.key(&self.prefix))
    }

    /// Uploads a blob with one PUT.
    pub async fn put_blob(&self, id: BlobId, bytes: bytes::Bytes) -> Result<(), S3Error> {
        let path = self.path(id);
        self.s3
            .put(&path, PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|source| S3Error::Request {
                op: "PUT",
                key: path.to_string(),
                source,
            })
    }

    async fn get_range(
        &self,
        id: BlobId,
        range: std::ops::Range<u64>,
    ) -> Result<bytes::Bytes, S3Error> {
        let path = self.path(id);
        self.s3
            .get_range(&path, range)
            .await
            .map_err(|source| match source {
                object_store::Error::NotFound { .. } => S3Error::Missing {
                    key: path.to_string(),
                },
                source => S3Error::Request {
                    op: "GET",
                    key: path.to_string(),
                    source,
                },
            })
    }

    /// Runs `fetch` (GETs of blob `id` and a check of what came) until the check passes, up
    /// to `get_tries` times: a short or corrupted answer is asked again before it is
    /// `Corrupt`. A failed request is returned at once (the mover retries those).
    async fn checked<T, F, Fut>(&self, id: BlobId, fetch: F) -> Result<T, S3Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Result<T, BlobError>, S3Error>>,
    {
        let mut last = None;
        for _ in 0..self.get_tries {
            match fetch().await? {
                Ok(v) => return Ok(v),
                Err(e) => {
                    tracing::warn!("blob {id}: {e}; asking again");
                    last = Some(e);
                }
            }
        }
        Err(S3Error::Corrupt {
            key: self.path(id).to_string(),
            source: last.expect("at least one try"),
        })
    }

    /// Reads an extent with a ranged GET and checks it (a bad answer is asked again).
    pub async fn get_extent(&self, p: &Placed) -> Result<Vec<u8>, S3Error> {
        self.checked(p.blob, || async {
            let b = self
                .get_range(p.blob, p.blob_offset..p.blob_offset + u64::from(p.len))
                .await?;
            Ok(blob::verify_extent(p, &b).map(|()| b.to_vec()))
        })
        .await
    }

    /// Reads a blob's header and extent table (two ranged GETs) and checks them.
    pub async fn read_table(&self, id: BlobId) -> Result<(Header, Vec<Placed>), S3Error> {
        let t = self.read_full_table(id).await?;
        Ok((t.header, t.extents))
    }

    /// [`BlobStore::read_table`] with the extents' block CRCs (format 2).
    pub async fn read_full_table(&self, id: BlobId) -> Result<Table, S3Error> {
        self.checked(id, || async {
            let head = self.get_range(id, 0..blob::HEADER_BYTES as u64).await?;
            let h = match blob::parse_header(&head) {
                Ok(h) => h,
                Err(e) => return Ok(Err(e)),
            };
            let table = self.get_range(id, 0..h.table_end()).await?;
            Ok(blob::parse_full_table(&h, &table))
        })
        .await
    }

    /// Fetches the whole blocks around `[offset, offset + len)` of extent `p` (clipped to
    /// it) by one ranged GET, each checked against `blocks` (which the caller checked
    /// against the extent with [`ExtentBlocks::check`]; a bad answer is asked again).
    pub async fn get_blocks(
        &self,
        p: &Placed,
        blocks: &ExtentBlocks,
        offset: u64,
        len: u64,
    ) -> Result<FetchedBlocks, S3Error> {
        let (first, range) = blocks.cover(p, offset, len);
        if range.is_empty() {
            return Ok(FetchedBlocks {
                first,
                range,
                bytes: Vec::new(),
            });
        }
        self.checked(p.blob, || async {
            let bytes = self.get_range(p.blob, range.clone()).await?.to_vec();
            Ok(blocks
                .verify(p, first, &range, &bytes)
                .map(|()| FetchedBlocks {
                    first,
                    range: range.clone(),
                    bytes,
                }))
        })
        .await
    }

    /// `[offset, offset + len)` of extent `p` (clipped to it), by [`BlobStore::get_blocks`].
    pub async fn get_piece(
        &self,
        p: &Placed,
        blocks: &ExtentBlocks,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, S3Error> {
        let f = self.get_blocks(p, blocks, offset, len).await?;
        Ok(f.piece(p, offset, len).to_vec())
    }

    /// Deletes a blob (one DELETE; deleting a missing blob is no error on S3).
    pub async fn delete_blob(&self, id: BlobId) -> Result<(), S3Error> {
        let path = self.path(id);
        match self.s3.delete(&path).await {
            // Already gone (a DELETE repeated after a crash, or lost on the store): done.
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(S3Error::Request {
                op: "DELETE",
                key: path.to_string(),
                source,
            }),
        }
    }
}

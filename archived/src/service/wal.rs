//! WAL requests: store ([`ingest`]), fetch and list WAL files, and bind a cluster name
//! to its PostgreSQL system.
//!
//! Contract of [`ingest`] (what `PutWal` answers): `Stored` only once the object is
//! durably in the store (create-only) and its catalog entry is flushed. The body is
//! verified on the way in (zstd frame complete, size and blake3 as announced, WAL header
//! consistent with the name and with the cluster's binding); anything else is refused
//! and leaves neither an object nor a catalog entry behind. A file already archived with
//! the same blake3 is `Stored { already_present: true }`; with another, `Conflict`, and
//! the archived copy stays. "Already archived" is the store's answer, never the
//! catalog's alone: a catalog entry whose object is gone is stored again.
//!
//! Memory ([`super::budget`]): the body is read [`CHUNK_SIZE`] at a time however large
//! the file, through a decoder whose window the frame header declares (2 MiB for a
//! push at zstd level 3; at most 128 MiB); that much is granted once the frame header
//! has arrived, and given back before the commit, which takes its own grant (nothing on
//! a local store, the object up to 16 MiB or its parts in flight on a remote one).

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};
use walvault_protocol::core::format::codec::{
    DecodeOrSinkError, VerifyingDecoder, CHUNK_SIZE, HEAD_LEN,
};
use walvault_protocol::core::pg::wal::{validate_wal_file, LongPageHeader, WalFileName};
use walvault_protocol::core::wire::audit::Step;
use walvault_protocol::core::wire::paging::WAL_PAGE_FILES;
use walvault_protocol::core::wire::{ErrorCode, Response, MAX_OBJECT_SIZE};
use walvault_protocol::net::pki::Role;

use super::audit::{self, Provenance};
use super::budget::{FrameStart, READ_BUFFER};
use super::{Ctx, Refusal, Reply, StreamReply};
use crate::index::clusters::ClusterBinding;
use crate::index::wal::WalEntry;
use crate::store::{layout, CreateOutcome, ObjectHeader, HEADER_LEN};

/// A WAL file offered for storage: what `PutWal` announces.
#[derive(Clone, Debug)]
pub(crate) struct WalUpload<'a> {
    /// Cluster name (already checked against the certificate).
    pub(crate) cluster: &'a str,
    /// WAL file name as PostgreSQL names it.
    pub(crate) name: &'a str,
    /// Size of the raw file.
    pub(crate) raw_size: u64,
    /// blake3 of the raw file, hex.
    pub(crate) blake3: &'a str,
    /// The client's request id (audit trail).
    pub(crate) request: Option<&'a str>,
    /// Who sends it, when not the request's certificate (the streaming receiver's
    /// segments, stored by archived itself).
    pub(crate) via: Option<&'a str>,
}

impl WalUpload<'_> {
    fn provenance(&self, ctx: &Ctx<'_>) -> Provenance {
        Provenance {
            request: self.request.map(str::to_string),
            peer: self
                .via
                .map(str::to_string)
                .unwrap_or_else(|| ctx.identity.peer()),
        }
    }
}

fn parse_name(name: &str) -> Result<WalFileName, Refusal> {
    name.parse::<WalFileName>()
        .map_err(|e| Refusal::invalid(e.to_string()))
}

/// Stores one WAL file whose body (one zstd frame of the raw file) `source` yields:
/// what `PutWal` does, and what the streaming receiver does with completed segments.
/// Every outcome is in the audit trail: received, stored and acknowledged before the
/// answer, or refused.
pub(crate) async fn ingest(
    ctx: &Ctx<'_>,
    upload: &WalUpload<'_>,
    source: &mut (impl AsyncRead + Unpin + Send),
) -> Reply {
    let provenance = upload.provenance(ctx);
    let reply = ingest_recorded(ctx, upload, &provenance, source).await;
    if let Err(r) = &reply {
        let mut refused = provenance.record(upload.cluster, upload.name, Step::Refused);
        refused.size = Some(upload.raw_size);
        refused.blake3 = Some(upload.blake3.to_string());
        refused.detail = Some(format!("{:?}: {}", r.code, r.message));
        audit::note(ctx.index, refused);
    }
    reply
}

async fn ingest_recorded(
    ctx: &Ctx<'_>,
    upload: &WalUpload<'_>,
    provenance: &Provenance,
    source: &mut (impl AsyncRead + Unpin + Send),
) -> Reply {
    let started = std::time::Instant::now();
    let WalUpload {
        cluster,
        name,
        raw_size,
        blake3,
        ..
    } = *upload;
    if !matches!(ctx.identity.role, Role::Push | Role::Admin) {
        return Err(Refusal::new(
            ErrorCode::Unauthorized,
            format!(
                "a {} certificate may not write WAL; issue a push certificate",
                ctx.identity.role
            ),
        ));
    }
    let wal_name = parse_name(name)?;
    if raw_size > MAX_OBJECT_SIZE {
        return Err(Refusal::new(
            ErrorCode::TooLarge,
            format!("{name}: {raw_size} bytes exceeds the {MAX_OBJECT_SIZE} byte limit"),
        ));
    }
    let mut hash = [0u8; 32];
    hex::decode_to_slice(blake3, &mut hash)
        .map_err(|_| Refusal::invalid("blake3 must be 64 hex digits"))?;

    let key = layout::wal_key(cluster, &wal_name);
    // The catalog only says where to look: a duplicate is acknowledged from the object's
    // header in the store (only duplicates pay that read), and an entry whose object is
    // gone (a crash, an operator, a bucket lifecycle rule) is stored again.
    if ctx
        .index
        .wal(cluster, &wal_name)
        .map_err(Refusal::internal)?
        .is_some()
    {
        match ctx
            .store
            .read_header(&key)
            .await
            .map_err(Refusal::internal)?
        {
            Some(h) if h.blake3 == hash => {
                let mut ack = provenance.record(cluster, name, Step::Acknowledged);
                ack.size = Some(raw_size);
                ack.blake3 = Some(blake3.to_string());
                ack.detail = Some("already archived with the same blake3; body not read".into());
                ctx.index.audit_put(ack).map_err(Refusal::internal)?;
                ctx.index.flush().await.map_err(Refusal::internal)?;
                return Ok(Response::Stored {
                    already_present: true,
                });
            }
            Some(h) => return Err(conflict(cluster, name, &h.blake3_hex(), blake3)),
            None => tracing::warn!(
                %cluster, %name,
                "the catalog lists a WAL file the store does not hold; storing it again"
            ),
        }
    }

    let start = FrameStart::read(source, name).await?;
    let receiving = ctx
        .budget
        .body(
            start.decoder_memory() + READ_BUFFER + HEAD_LEN as u64,
            &format!("PutWal {name}"),
        )
        .await?;
    let source = &mut AsyncReadExt::chain(start.bytes(), &mut *source);
    let mut pending = ctx.store.begin(&key).await.map_err(Refusal::internal)?;
    let mut decoder = VerifyingDecoder::new(raw_size).map_err(|e| Refusal::internal(e.into()))?;
    let mut batch: Vec<u8> = Vec::with_capacity(CHUNK_SIZE);
    let invalid = |e: DecodeOrSinkError<std::convert::Infallible>| {
        Refusal::invalid(format!("{name}: body is not the announced file: {e}"))
    };
    loop {
        batch.clear();
        let end = super::fill(source, &mut batch, CHUNK_SIZE)
            .await
            .map_err(|e| Refusal::invalid(format!("{name}: body stream failed: {e}")))?;
        if pending.written() + batch.len() as u64 > MAX_OBJECT_SIZE {
            return Err(Refusal::new(
                ErrorCode::TooLarge,
                format!("{name}: body exceeds {MAX_OBJECT_SIZE} bytes"),
            ));
        }
        if !batch.is_empty() {
            decoder.write(&batch, |_| Ok(())).map_err(invalid)?;
            pending.write(&batch).await.map_err(Refusal::internal)?;
        }
        if end {
            break;
        }
    }
    let not_announced =
        |e| Refusal::invalid(format!("{name}: body is not the announced file: {e}"));
    drop(batch);
    let summary = decoder.finish().map_err(not_announced)?;
    drop(receiving);
    summary.check(raw_size, blake3).map_err(not_announced)?;
    let facts = validate_wal_file(name, &summary.head, summary.raw_len)
        .map_err(|e| Refusal::invalid(format!("{name}: {e}")))?;
    if let Some(header) = facts.header {
        check_binding(ctx, cluster, name, &header).await?;
    }
    let received_in = started.elapsed();

    let object_header = ObjectHeader {
        raw_size,
        blake3: hash,
        compressed_size: pending.written(),
    };
    let stored_size = HEADER_LEN as u64 + pending.written();
    let _committing = ctx
        .budget
        .body(
            ctx.store.commit_memory(stored_size),
            &format!("storing {name}"),
        )
        .await?;
    let outcome = ctx
        .store
        .commit(pending, &object_header)
        .await
        .map_err(Refusal::internal)?;
    let entry = match outcome {
        CreateOutcome::Created => WalEntry {
            raw_size,
            blake3: object_header.blake3_hex(),
            stored_size,
        },
        CreateOutcome::Exists => {
            let existing = ctx
                .store
                .read_header(&key)
                .await
                .map_err(Refusal::internal)?
                .ok_or_else(|| {
                    Refusal::internal(anyhow::anyhow!("{key} vanished after a create conflict"))
                })?;
            if existing.blake3 != hash {
                return Err(conflict(cluster, name, &existing.blake3_hex(), blake3));
            }
            WalEntry {
                raw_size: existing.raw_size,
                blake3: existing.blake3_hex(),
                stored_size: HEADER_LEN as u64 + existing.compressed_size,
            }
        }
    };
    // The trail's steps go into the flush that makes the entry durable: in the catalog
    // before the client hears "stored".
    let steps = [
        (
            Step::Received,
            Some(received_in),
            "body complete, size, blake3 and WAL header as announced".to_string(),
        ),
        (
            Step::Stored,
            None,
            match outcome {
                CreateOutcome::Created => format!("{key}, {} bytes stored", entry.stored_size),
                CreateOutcome::Exists => format!("{key} already held these bytes"),
            },
        ),
        (
            Step::Acknowledged,
            Some(started.elapsed()),
            "answered stored".to_string(),
        ),
    ];
    for (step, took, detail) in steps {
        let mut r = provenance.record(cluster, name, step);
        r.size = Some(raw_size);
        r.blake3 = Some(entry.blake3.clone());
        r.duration_us = took.map(|d| d.as_micros() as u64);
        r.detail = Some(detail);
        ctx.index.audit_put(r).map_err(Refusal::internal)?;
    }
    ctx.index
        .put_wal(cluster, &wal_name, &entry)
        .await
        .map_err(Refusal::internal)?;
    Ok(Response::Stored {
        already_present: outcome == CreateOutcome::Exists,
    })
}

fn conflict(cluster: &str, name: &str, archived: &str, offered: &str) -> Refusal {
    Refusal::new(
        ErrorCode::Conflict,
        format!(
            "cluster '{cluster}' already has a different {name} (archived blake3 {}, offered {}); the archived copy is kept. \
             Two servers may be pushing under one cluster name, or the file changed after it was archived.",
            &archived[..archived.len().min(16)],
            &offered[..offered.len().min(16)]
        ),
    )
}

/// Binds the cluster name to the segment's system identifier at the first push, and
/// refuses segments of any other system afterwards.
pub(super) async fn check_binding(
    ctx: &Ctx<'_>,
    cluster: &str,
    name: &str,
    header: &LongPageHeader,
) -> Result<(), Refusal> {
    let offered = ClusterBinding {
        system_identifier: header.system_identifier,
        wal_segment_size: header.segment_size,
        pg_version: header.pg_major(),
    };
    let bound = match ctx.index.binding(cluster).map_err(Refusal::internal)? {
        Some(b) => b,
        None => {
            let _serial = ctx.archive.binding_lock.lock().await;
            let key = layout::cluster_key(cluster);
            let text = toml::to_string(&offered).map_err(|e| Refusal::internal(e.into()))?;
            ctx.store
                .put_new(&key, Bytes::from(text))
                .await
                .map_err(Refusal::internal)?;
            let stored = ctx
                .store
                .get_small(&key)
                .await
                .map_err(Refusal::internal)?
                .unwrap_or_default();
            let bound: ClusterBinding = toml::from_str(&String::from_utf8_lossy(&stored))
                .map_err(|e| Refusal::internal(anyhow::anyhow!("{key} is unreadable: {e}")))?;
            ctx.index
                .put_binding(cluster, &bound)
                .await
                .map_err(Refusal::internal)?;
            if bound == offered {
                tracing::info!(%cluster, system_identifier = bound.system_identifier, "cluster bound to its system identifier");
            }
            bound
        }
    };
    if bound.system_identifier != offered.system_identifier {
        return Err(Refusal::new(
            ErrorCode::WrongCluster,
            format!(
                "{name} belongs to the PostgreSQL system {} but cluster '{cluster}' is bound to system {}. \
                 Each PostgreSQL cluster needs its own cluster name (archived issue --cluster NAME).",
                offered.system_identifier, bound.system_identifier
            ),
        ));
    }
    if bound.wal_segment_size != offered.wal_segment_size {
        return Err(Refusal::new(
            ErrorCode::WrongCluster,
            format!(
                "{name} has {} byte segments but cluster '{cluster}' uses {} byte segments",
                offered.wal_segment_size, bound.wal_segment_size
            ),
        ));
    }
    Ok(())
}

/// `GetWal`: the object, or `NotFound`.
pub(crate) async fn get(ctx: &Ctx<'_>, cluster: &str, name: &str) -> StreamReply {
    let wal_name = parse_name(name)?;
    let key = layout::wal_key(cluster, &wal_name);
    let answer = super::object(ctx, &key, || {
        Refusal::new(
            ErrorCode::NotFound,
            format!("{name} is not in the archive of cluster '{cluster}'"),
        )
    })
    .await;
    match (answer, wal_name) {
        // Not complete: the streaming receiver's unfinished segment or a `.partial` from
        // archive_command, whichever holds more of it.
        (Err(r), WalFileName::Segment(segment)) if r.code == ErrorCode::NotFound => {
            match super::stream::unfinished_object(ctx, cluster, &segment).await {
                Some(partial) => partial,
                None => Err(r),
            }
        }
        (answer, _) => answer,
    }
}

/// `ListWal`: one page of the listing, the files after the cursor `after` (a WAL file
/// name, as the previous page's `next` gave it).
/// The first page also lists the streaming receiver's unfinished segments.
pub(crate) async fn list(ctx: &Ctx<'_>, cluster: &str, after: Option<&str>, paged: bool) -> Reply {
    let after = after.map(parse_name).transpose()?;
    // A client from before paging takes its one answer for the whole listing: give it
    // the whole (the frame limit turns one too large into TooLarge), not a first page.
    let per_page = if paged { WAL_PAGE_FILES } else { usize::MAX };
    let mut page = ctx
        .index
        .listing_page(cluster, after.as_ref(), per_page)
        .map_err(Refusal::internal)?;
    if after.is_none() {
        page.streamed = super::stream::streamed(ctx, cluster)
            .await
            .map_err(Refusal::internal)?;
    }
    Ok(Response::WalList(page))
}

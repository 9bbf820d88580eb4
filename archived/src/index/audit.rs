//! The audit trail in the catalog: every step of every WAL file's life
//! (`core::wire::audit`), and which of them the store already holds.
//!
//! ```text
//! tree "audit"            <cluster>/<id>          -> JSON AuditRecord
//! tree "audit_files"      <cluster>/<file>/<id>   -> ""   (a file's records; the
//!                         <cluster>//<id>            cluster's own records: file "")
//! tree "audit_unexported" <id>/<cluster>          -> ""   (not yet in a store batch)
//! tree "audit_batches"    <cluster>/<object key>  -> JSON BatchEntry
//! ```
//!
//! Ids are 16 hex digits of the time in microseconds and 16 of sled's monotonic id, so
//! every tree keyed by them is in recording order, and a new catalog (whose sled ids start
//! again) cannot reuse an id: its clock has moved on.
//!
//! Durability: records are written unflushed; a step whose answer must not outrun its
//! record (stored, acknowledged) is written before the flush that makes the step itself
//! durable (the WAL entry's), so it costs no fsync of its own. The store side (batches,
//! their export and pruning) is service/audit.rs.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use walvault_protocol::core::wire::audit::{AuditRecord, ExpiredSummary, Step};

use super::{get_json, put_json, Index, RebuildSummary};
use crate::store::{layout, Store};

/// A batch object of the store, as the catalog knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BatchEntry {
    /// The WAL files it has records of.
    pub(crate) files: Vec<String>,
    /// Ids of its records of the whole cluster (no file).
    pub(crate) cluster_records: Vec<String>,
    /// The lowest and highest id of its records of files.
    #[serde(default)]
    pub(crate) first: String,
    #[serde(default)]
    pub(crate) last: String,
}

fn file_prefix(cluster: &str, file: Option<&str>) -> String {
    format!("{cluster}/{}/", file.unwrap_or(""))
}

/// A new record of `step`, stamped now.
pub(crate) fn record(cluster: &str, file: Option<&str>, step: Step) -> AuditRecord {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let at_us = now.as_micros() as i64;
    AuditRecord {
        id: String::new(),
        at_us,
        time: chrono::DateTime::from_timestamp_micros(at_us)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
            .unwrap_or_default(),
        cluster: cluster.to_string(),
        file: file.map(str::to_string),
        step,
        request: None,
        peer: None,
        size: None,
        blake3: None,
        duration_us: None,
        detail: None,
        summary: None,
    }
}

impl Index {
    /// Adds `record` to the trail (unflushed), giving it its id.
    pub(crate) fn audit_put(&self, mut record: AuditRecord) -> Result<AuditRecord> {
        let seq = self.db.generate_id()?;
        record.id = format!("{:016x}{seq:016x}", record.at_us.max(0));
        self.audit_insert(&record, true)?;
        Ok(record)
    }

    fn audit_insert(&self, record: &AuditRecord, unexported: bool) -> Result<()> {
        let cluster = &record.cluster;
        put_json(&self.audit, &format!("{cluster}/{}", record.id), record)?;
        self.audit_files.insert(
            format!(
                "{}{}",
                file_prefix(cluster, record.file.as_deref()),
                record.id
            ),
            &[],
        )?;
        if unexported {
            self.audit_unexported
                .insert(format!("{}/{cluster}", record.id), &[])?;
        }
        Ok(())
    }

    fn audit_remove(&self, cluster: &str, file: Option<&str>, id: &str) -> Result<()> {
        self.audit.remove(format!("{cluster}/{id}"))?;
        self.audit_files
            .remove(format!("{}{id}", file_prefix(cluster, file)))?;
        self.audit_unexported.remove(format!("{id}/{cluster}"))?;
        Ok(())
    }

    /// Ids of a file's records (`None`: the cluster's own), oldest first, from `from`.
    fn audit_ids(&self, cluster: &str, file: Option<&str>, from: &str) -> Result<Vec<String>> {
        let prefix = file_prefix(cluster, file);
        let mut ids = Vec::new();
        for k in self
            .audit_files
            .range(format!("{prefix}{from}").into_bytes()..)
            .keys()
        {
            let k = k?;
            let k = String::from_utf8_lossy(&k);
            let Some(id) = k.strip_prefix(&prefix) else {
                break;
            };
            ids.push(id.to_string());
        }
        Ok(ids)
    }

    fn audit_get(&self, cluster: &str, id: &str) -> Result<Option<AuditRecord>> {
        get_json(&self.audit, &format!("{cluster}/{id}"))
    }

    fn audit_records(&self, cluster: &str, ids: &[String]) -> Result<Vec<AuditRecord>> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(r) = self.audit_get(cluster, id)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// A file's story: its records, and the cluster's verify runs since its first one
    /// (up to its expiry), oldest first.
    pub(crate) fn audit_history(&self, cluster: &str, file: &str) -> Result<Vec<AuditRecord>> {
        let ids = self.audit_ids(cluster, Some(file), "")?;
        let mut records = self.audit_records(cluster, &ids)?;
        let Some(first) = records.first().cloned() else {
            return Ok(records);
        };
        // An expired record stands for everything before it: its summary's first store.
        let from = first
            .summary
            .as_ref()
            .and_then(|s| s.stored_at_us)
            .map(|at| format!("{:016x}", at.max(0)))
            .unwrap_or_else(|| first.id.clone());
        let until = records
            .iter()
            .rev()
            .find(|r| r.step == Step::Expired)
            .filter(|_| records.last().map(|r| r.step) == Some(Step::Expired))
            .map(|r| r.id.clone());
        let cluster_ids = self.audit_ids(cluster, None, &from)?;
        for r in self.audit_records(cluster, &cluster_ids)? {
            if r.step == Step::Verified && until.as_ref().is_none_or(|u| r.id < *u) {
                records.push(r);
            }
        }
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(records)
    }

    /// At most `limit` records of a cluster at or after `since_us` and after the record
    /// id `after`, oldest first, and the cursor of the next page.
    pub(crate) fn audit_since(
        &self,
        cluster: &str,
        since_us: i64,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<AuditRecord>, Option<String>)> {
        use std::ops::Bound;
        let prefix = format!("{cluster}/");
        let since = format!("{prefix}{:016x}", since_us.max(0));
        let start = match after {
            Some(a) if format!("{prefix}{a}") >= since => {
                Bound::Excluded(format!("{prefix}{a}").into_bytes())
            }
            _ => Bound::Included(since.into_bytes()),
        };
        let end = Bound::Excluded(format!("{cluster}0").into_bytes());
        let mut out = Vec::new();
        let mut more = false;
        for item in self.audit.range::<Vec<u8>, _>((start, end)) {
            let (_, v) = item?;
            if out.len() == limit.max(1) {
                more = true;
                break;
            }
            out.push(serde_json::from_slice::<AuditRecord>(&v)?);
        }
        let next = if more {
            out.last().map(|r| r.id.clone())
        } else {
            None
        };
        Ok((out, next))
    }

    /// Retention removed `file`: its records are replaced by one `expired` record that
    /// summarizes them (unflushed; the caller's flush makes it durable).
    pub(crate) fn audit_expire(
        &self,
        cluster: &str,
        file: &str,
        detail: &str,
    ) -> Result<AuditRecord> {
        let ids = self.audit_ids(cluster, Some(file), "")?;
        let records = self.audit_records(cluster, &ids)?;
        let mut expired = record(cluster, Some(file), Step::Expired);
        expired.detail = Some(detail.to_string());
        if let Some(stored) = records.iter().find(|r| r.step == Step::Stored) {
            expired.size = stored.size;
            expired.blake3 = stored.blake3.clone();
        }
        expired.summary = Some(ExpiredSummary::of(&records));
        for id in &ids {
            self.audit_remove(cluster, Some(file), id)?;
        }
        self.audit_put(expired)
    }

    /// At most `limit` records not yet in a store batch, oldest first.
    pub(crate) fn audit_unexported(&self, limit: usize) -> Result<Vec<AuditRecord>> {
        let mut out = Vec::new();
        for k in self.audit_unexported.iter().keys().take(limit) {
            let k = k?;
            let k = String::from_utf8_lossy(&k);
            let Some((id, cluster)) = k.split_once('/') else {
                continue;
            };
            match self.audit_get(cluster, id)? {
                Some(r) => out.push(r),
                // Removed meanwhile (expired): nothing to export.
                None => {
                    self.audit_unexported.remove(k.as_bytes())?;
                }
            }
        }
        Ok(out)
    }

    /// `records` of `cluster` are in the store as batch `key` (unflushed).
    pub(crate) fn audit_exported(
        &self,
        cluster: &str,
        key: &str,
        records: &[AuditRecord],
    ) -> Result<()> {
        let mut entry = BatchEntry::default();
        for r in records {
            self.audit_unexported
                .remove(format!("{}/{cluster}", r.id))?;
            match &r.file {
                Some(f) => {
                    if !entry.files.contains(f) {
                        entry.files.push(f.clone());
                    }
                    if entry.first.is_empty() || r.id < entry.first {
                        entry.first = r.id.clone();
                    }
                    if r.id > entry.last {
                        entry.last = r.id.clone();
                    }
                }
                None => entry.cluster_records.push(r.id.clone()),
            }
        }
        put_json(&self.audit_batches, &format!("{cluster}/{key}"), &entry)
    }

    /// The batches of `cluster` none of whose records of files is still in the trail
    /// (every file it names expired after it, and an `expired` record of a later batch
    /// stands for them): what pruning may delete.
    pub(crate) fn audit_prunable(&self, cluster: &str) -> Result<Vec<(String, BatchEntry)>> {
        let mut out = Vec::new();
        for (key, entry) in super::scan_cluster::<BatchEntry>(&self.audit_batches, cluster)? {
            let mut superseded = !entry.files.is_empty();
            for f in &entry.files {
                // A live record of f in the batch's id range: the batch still holds it.
                let live = self.audit_ids(cluster, Some(f), &entry.first)?;
                if live.first().is_some_and(|id| *id <= entry.last) {
                    superseded = false;
                    break;
                }
            }
            if superseded {
                out.push((key, entry));
            }
        }
        Ok(out)
    }

    /// Marks a cluster's records for export again (those of a batch about to be
    /// deleted that describe the cluster, not a file).
    pub(crate) fn audit_requeue(&self, cluster: &str, ids: &[String]) -> Result<()> {
        for id in ids {
            if self.audit.contains_key(format!("{cluster}/{id}"))? {
                self.audit_unexported
                    .insert(format!("{id}/{cluster}"), &[])?;
            }
        }
        Ok(())
    }

    /// Forgets a batch (before its object is deleted).
    pub(crate) fn audit_forget_batch(&self, cluster: &str, key: &str) -> Result<()> {
        self.audit_batches.remove(format!("{cluster}/{key}"))?;
        Ok(())
    }

    /// Records that are not in the store yet.
    pub(crate) fn audit_pending(&self) -> usize {
        self.audit_unexported.len()
    }
}

/// Empties the trees (start of a rebuild).
pub(super) fn clear(index: &Index) -> Result<()> {
    index.audit.clear()?;
    index.audit_files.clear()?;
    index.audit_unexported.clear()?;
    index.audit_batches.clear()?;
    Ok(())
}

/// Indexes `key` during a rebuild if it is an audit batch; `Ok(false)` if it is not one.
pub(super) async fn index_object(
    index: &Index,
    store: &Store,
    key: &str,
    summary: &mut RebuildSummary,
) -> Result<bool> {
    let Some(cluster) = layout::parse_audit_key(key) else {
        return Ok(false);
    };
    let Some(bytes) = store.get_small(key).await? else {
        return Ok(true);
    };
    match parse_batch(&bytes) {
        Ok(records) => {
            let records: Vec<AuditRecord> = records
                .into_iter()
                .filter(|r| r.cluster == cluster)
                .collect();
            for r in &records {
                index.audit_insert(r, false)?;
            }
            summary.audit_records += records.len() as u64;
            index.audit_exported(&cluster, key, &records)?;
        }
        Err(e) => {
            summary.unreadable += 1;
            tracing::error!(%key, error = %format!("{e:#}"), "unreadable audit batch; not indexed");
        }
    }
    Ok(true)
}

/// After a rebuild: a file's records older than its newest `expired` record are those
/// of a batch that pruning had not deleted yet; the summary stands for them.
pub(super) fn settle(index: &Index) -> Result<()> {
    let mut doomed = Vec::new();
    let mut last: Option<(String, String)> = None; // (file prefix, newest expired id)
    let keys: Vec<String> = index
        .audit_files
        .iter()
        .keys()
        .rev()
        .map(|k| k.map(|k| String::from_utf8_lossy(&k).into_owned()))
        .collect::<Result<_, _>>()?;
    for k in keys {
        let Some((prefix, id)) = k.rsplit_once('/') else {
            continue;
        };
        let (cluster, file) = prefix.split_once('/').unwrap_or((prefix, ""));
        if file.is_empty() {
            continue;
        }
        let newest_expired = match &last {
            Some((p, e)) if p == prefix => Some(e.clone()),
            _ => None,
        };
        match newest_expired {
            Some(e) if id < e.as_str() => {
                doomed.push((cluster.to_string(), file.to_string(), id.to_string()))
            }
            Some(_) => {}
            None => {
                if let Some(r) = index.audit_get(cluster, id)? {
                    if r.step == Step::Expired {
                        last = Some((prefix.to_string(), id.to_string()));
                    }
                }
            }
        }
    }
    for (cluster, file, id) in doomed {
        index.audit_remove(&cluster, Some(&file), &id)?;
    }
    Ok(())
}

/// After a rebuild: a WAL file the store holds without any record (stored in the last
/// seconds before the catalog was lost, before the trail's next export; or before the
/// trail existed) gets a `stored` record made from its object, so that no stored file is
/// missing from the trail. Its time is the rebuild's; its peer and request are unknown.
pub(super) fn note_unrecorded_files(index: &Index) -> Result<u64> {
    let mut added = 0;
    for cluster in index.clusters()? {
        for (name, entry) in index.wal_files(&cluster)? {
            let name = name.to_string();
            if !index.audit_ids(&cluster, Some(&name), "")?.is_empty() {
                continue;
            }
            let mut r = record(&cluster, Some(&name), Step::Stored);
            r.size = Some(entry.raw_size);
            r.blake3 = Some(entry.blake3.clone());
            r.detail = Some(
                "found in the store by a catalog rebuild: when, by whom and in which request it was \
                 stored is not known (it was stored just before the catalog was lost, or before \
                 this archive kept an audit trail)"
                    .into(),
            );
            index.audit_put(r)?;
            added += 1;
        }
    }
    Ok(added)
}

/// The records of a batch object: zstd of JSON lines.
pub(crate) fn parse_batch(bytes: &[u8]) -> Result<Vec<AuditRecord>> {
    let raw = zstd::decode_all(bytes)?;
    let mut out = Vec::new();
    for line in raw.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        out.push(serde_json::from_slice(line)?);
    }
    Ok(out)
}

/// A batch object's bytes.
pub(crate) fn batch_bytes(records: &[AuditRecord]) -> Result<Vec<u8>> {
    let mut raw = Vec::new();
    for r in records {
        serde_json::to_writer(&mut raw, r)?;
        raw.push(b'\n');
    }
    Ok(zstd::encode_all(&raw[..], 3)?)
}

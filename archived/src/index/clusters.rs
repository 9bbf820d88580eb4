//! Cluster bindings: which PostgreSQL system a cluster name belongs to.
//!
//! `<cluster>/cluster.toml` in the store (written create-only at the first segment
//! pushed, service/wal.rs) holds a [`ClusterBinding`]; the tree "clusters" indexes it
//! as JSON under the cluster name.

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::{Index, RebuildSummary};
use crate::store::{layout, Store};

/// What binds a cluster name to one PostgreSQL cluster (`<cluster>/cluster.toml`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ClusterBinding {
    /// pg_control system identifier.
    pub(crate) system_identifier: u64,
    /// WAL segment size; one PostgreSQL cannot have is refused wherever a binding is
    /// parsed (cluster.toml, the catalog), so segment arithmetic never sees it.
    #[serde(deserialize_with = "walvault_protocol::core::pg::wal::deserialize_segment_size")]
    pub(crate) wal_segment_size: u32,
    /// PostgreSQL major version of the first segment pushed.
    pub(crate) pg_version: u32,
}

impl Index {
    /// The binding of a cluster.
    pub(crate) fn binding(&self, cluster: &str) -> Result<Option<ClusterBinding>> {
        super::get_json(&self.clusters, cluster)
    }

    /// Records a binding and flushes.
    pub(crate) async fn put_binding(&self, cluster: &str, binding: &ClusterBinding) -> Result<()> {
        super::put_json(&self.clusters, cluster, binding)?;
        self.flush().await
    }

    /// Every cluster with a binding.
    pub(crate) fn clusters(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for item in self.clusters.iter() {
            let (k, _) = item?;
            out.push(String::from_utf8_lossy(&k).into_owned());
        }
        Ok(out)
    }

    /// Segment size of a cluster (16 MiB until a segment was pushed).
    pub(crate) fn segment_size(&self, cluster: &str) -> Result<u32> {
        Ok(self
            .binding(cluster)?
            .map(|b| b.wal_segment_size)
            .unwrap_or(16 << 20))
    }
}

/// Empties the tree (start of a rebuild).
pub(super) fn clear(index: &Index) -> Result<()> {
    index.clusters.clear()?;
    Ok(())
}

/// Indexes `key` during a rebuild if it is a binding; `Ok(false)` if it is not one.
pub(super) async fn index_object(
    index: &Index,
    store: &Store,
    key: &str,
    summary: &mut RebuildSummary,
) -> Result<bool> {
    let Some(cluster) = layout::parse_cluster_key(key) else {
        return Ok(false);
    };
    if let Some(bytes) = store.get_small(key).await? {
        let text = String::from_utf8_lossy(&bytes);
        match toml::from_str::<ClusterBinding>(&text) {
            Ok(b) => {
                super::put_json(&index.clusters, cluster, &b)?;
                summary.clusters += 1;
            }
            Err(e) => {
                tracing::error!(%key, error = %e, "unreadable cluster binding; cluster not indexed")
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Before: a cluster.toml with segment size 0 was indexed, and the first listing of
    /// its backups divided by zero.
    #[test]
    fn a_binding_with_an_impossible_segment_size_is_refused_when_parsed() {
        let text = |size: u32| {
            format!("system_identifier = 7\nwal_segment_size = {size}\npg_version = 15\n")
        };
        for bad in [0, 3 << 20, 1 << 31] {
            let e = toml::from_str::<ClusterBinding>(&text(bad)).unwrap_err();
            assert!(
                e.to_string().contains("implausible WAL segment size"),
                "{e}"
            );
            let json =
                format!(r#"{{"system_identifier":7,"wal_segment_size":{bad},"pg_version":15}}"#);
            assert!(serde_json::from_str::<ClusterBinding>(&json).is_err());
        }
        let b: ClusterBinding = toml::from_str(&text(1 << 20)).unwrap();
        assert_eq!(b.wal_segment_size, 1 << 20);
    }
}

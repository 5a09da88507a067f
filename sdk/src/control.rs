//! The SDK's use of the GCS: named actors and the actor directory, and the user key-value store.
//!
//! Embedded mode runs a one-replica GCS in this process (in a temporary directory, through the same replicated code
//! path). In cluster mode the head hosts the GCS replica and every node reaches it over the mesh through the GCS
//! client, which finds the leader, retries and applies deadlines. Names are bound with a compare-and-swap on absence,
//! so two nodes racing for one name cannot both win.

use std::sync::Arc;

use bytes::Bytes;
use oxray_gcs::tables::{ActorInfo, ActorState, Tables, hex_id};
use oxray_transport::NodeId;

use crate::error::{Error, Result};
use crate::runtime::{self, Runtime, block_on_io};

/// Namespace of everything the SDK stores; Ray's default namespace is per job, ours is per cluster for now.
pub(crate) const NAMESPACE: &str = "default";

fn gcs_err(e: impl std::fmt::Display) -> Error {
    Error::Cluster(format!("gcs: {e}"))
}

/// Where a named actor lives, as the directory knows it.
pub(crate) struct NamedEntry {
    pub(crate) actor: u128,
    pub(crate) class: String,
    pub(crate) node: u128,
    /// Times the actor was restarted, and the most it may be (its creator restarts it when its node dies).
    pub(crate) restarts: u32,
    pub(crate) max_restarts: u32,
}

fn tables(rt: &Runtime) -> Result<Tables> {
    rt.gcs
        .get()
        .cloned()
        .ok_or_else(|| Error::Cluster("this node has no GCS client".into()))
}

fn actor_info(
    rt: &Runtime,
    name: Option<&str>,
    actor: u128,
    class: &str,
    node: u128,
    max_restarts: u32,
) -> ActorInfo {
    ActorInfo {
        actor,
        class: class.to_string(),
        name: name.map(str::to_string),
        namespace: NAMESPACE.to_string(),
        node: Some(NodeId(node)),
        owner: NodeId(rt.node),
        state: ActorState::Alive,
        restarts: 0,
        max_restarts: i32::try_from(max_restarts).unwrap_or(i32::MAX),
        detached: false,
        death_cause: None,
    }
}

/// Records an unnamed actor that can restart in the directory, so handles held on other nodes can find its next
/// incarnation (a named one is recorded by [`register_named`]).
pub(crate) fn register_restartable(
    rt: &Arc<Runtime>,
    actor: u128,
    class: &str,
    node: u128,
    max_restarts: u32,
) -> Result<()> {
    let t = tables(rt)?;
    let info = actor_info(rt, None, actor, class, node, max_restarts);
    block_on_io(&rt.tokio, async move {
        t.actors.put(&hex_id(actor), &info).await.map_err(gcs_err)?;
        Ok(())
    })
}

/// Where the directory says an actor lives now: (node, restarts so far, most restarts), or `None` if the actor was
/// never recorded (it cannot restart, so its node's death was its own).
pub(crate) async fn actor_home(rt: &Runtime, actor: u128) -> Result<Option<(u128, u32, u32)>> {
    let t = tables(rt)?;
    let info = t.actors.get(&hex_id(actor)).await.map_err(gcs_err)?;
    Ok(info.map(|i| {
        (
            i.value.node.map(|n| n.0).unwrap_or(0),
            i.value.restarts,
            u32::try_from(i.value.max_restarts).unwrap_or(u32::MAX),
        )
    }))
}

/// Binds `name` to an actor and records the actor in the directory. Fails if the name is taken.
pub(crate) fn register_named(
    rt: &Arc<Runtime>,
    name: &str,
    actor: u128,
    class: &str,
    node: u128,
    max_restarts: u32,
) -> Result<()> {
    let t = tables(rt)?;
    let info = actor_info(rt, Some(name), actor, class, node, max_restarts);
    let name = name.to_string();
    block_on_io(&rt.tokio, async move {
        t.actors.put(&hex_id(actor), &info).await.map_err(gcs_err)?;
        if t.register_actor_name(NAMESPACE, &name, actor)
            .await
            .map_err(gcs_err)?
        {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "an actor named {name:?} already exists"
            )))
        }
    })
}

/// Looks a named actor up in the directory.
pub(crate) fn lookup_named(rt: &Arc<Runtime>, name: &str) -> Result<NamedEntry> {
    let t = tables(rt)?;
    let owned = name.to_string();
    block_on_io(&rt.tokio, async move {
        let actor = t
            .lookup_actor_name(NAMESPACE, &owned)
            .await
            .map_err(gcs_err)?
            .ok_or_else(|| Error::ActorNotFound(owned.clone()))?;
        let info = t
            .actors
            .get(&hex_id(actor))
            .await
            .map_err(gcs_err)?
            .ok_or(Error::ActorNotFound(owned))?;
        Ok(NamedEntry {
            actor,
            class: info.value.class,
            node: info.value.node.map(|n| n.0).unwrap_or(0),
            restarts: info.value.restarts,
            max_restarts: u32::try_from(info.value.max_restarts).unwrap_or(0),
        })
    })
}

/// Records in the directory that a restarted actor now lives on `node`, so name lookups and handles held on other
/// nodes find it there.
pub(crate) fn actor_moved(rt: &Arc<Runtime>, actor: u128, node: u128, restarts: u32) {
    let Ok(t) = tables(rt) else { return };
    let name = crate::runtime::short(actor);
    rt.tokio.spawn(async move {
        let key = hex_id(actor);
        match t.actors.get(&key).await {
            Ok(Some(mut info)) => {
                info.value.node = Some(NodeId(node));
                info.value.restarts = restarts;
                if let Err(e) = t.actors.put(&key, &info.value).await {
                    tracing::warn!(actor = %name, cause = %e, "restarted actor's new node not recorded");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(actor = %name, cause = %e, "restarted actor's new node not recorded"),
        }
    });
}

/// Frees a dead actor's name so it can be used again.
pub(crate) fn unregister_named(rt: &Arc<Runtime>, name: &str, actor: u128) {
    let Ok(t) = tables(rt) else { return };
    let name = name.to_string();
    rt.tokio.spawn(async move {
        let _ = t.unregister_actor_name(NAMESPACE, &name, actor).await;
    });
}

/// The user key-value store on the GCS: durable, replicated with the GCS, shared by every node of the cluster.
///
/// ```
/// oxray::init()?;
/// oxray::kv::put("model/version", b"7")?;
/// assert_eq!(oxray::kv::get("model/version")?.as_deref(), Some(&b"7"[..]));
/// assert!(oxray::kv::delete("model/version")?);
/// assert_eq!(oxray::kv::get("model/version")?, None);
/// # Ok::<(), oxray::Error>(())
/// ```
pub mod kv {
    use super::*;

    /// Sets `key` to `value`.
    pub fn put(key: &str, value: &[u8]) -> Result<()> {
        let rt = runtime::current()?;
        let t = tables(&rt)?;
        let (key, value) = (key.to_string(), Bytes::copy_from_slice(value));
        block_on_io(&rt.tokio, async move {
            t.kv_put(NAMESPACE, &key, value)
                .await
                .map(|_| ())
                .map_err(gcs_err)
        })
    }

    /// The value of `key`, if set.
    pub fn get(key: &str) -> Result<Option<Vec<u8>>> {
        let rt = runtime::current()?;
        let t = tables(&rt)?;
        let key = key.to_string();
        block_on_io(&rt.tokio, async move {
            t.kv_get(NAMESPACE, &key)
                .await
                .map(|v| v.map(|b| b.to_vec()))
                .map_err(gcs_err)
        })
    }

    /// Removes `key`; returns whether it was set.
    pub fn delete(key: &str) -> Result<bool> {
        let rt = runtime::current()?;
        let t = tables(&rt)?;
        let key = key.to_string();
        block_on_io(&rt.tokio, async move {
            t.kv_delete(NAMESPACE, &key).await.map_err(gcs_err)
        })
    }

    /// Every key and value.
    pub fn list() -> Result<Vec<(String, Vec<u8>)>> {
        let rt = runtime::current()?;
        let t = tables(&rt)?;
        block_on_io(&rt.tokio, async move {
            t.kv_list(NAMESPACE)
                .await
                .map(|v| v.into_iter().map(|(k, b)| (k, b.to_vec())).collect())
                .map_err(gcs_err)
        })
    }
}

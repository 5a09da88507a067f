//! Placement groups: bundles of resources reserved atomically across nodes, for tasks and actors to run in.
//!
//! The creator plans the bundles' nodes with the scheduler's planner (`oxray_scheduler::pg::plan`), then reserves
//! in two phases: every chosen node is asked to hold its bundles (`PG_PREPARE`); if any refuses, the holds already
//! made are released (`PG_RELEASE`) and the group is planned again a moment later. So a group is either wholly
//! reserved or not at all. A group waits (and `wait` says so) until the cluster can hold it. Removing a group frees
//! its resources and kills the actors placed in it; tasks already running in it finish.
//!
//! When a node dies, the creator places that node's bundles again (`node_died`); the others keep their holds.
//!
//! Not here: a cluster-wide directory of groups (a group is known to the process that created it, and dies with it).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use oxray_scheduler::{PgStrategy, PlacementGroupId, PlacementGroupSpec};
use oxray_transport::NodeId;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::object::{Entry, ObjectId, rand_u128};
use crate::options::Resources;
use crate::runtime::{self, Runtime};
use crate::wire::kind;

/// How a group's bundles are spread over nodes (Ray's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlacementStrategy {
    /// As few nodes as possible.
    Pack,
    /// As many nodes as possible.
    Spread,
    /// All bundles on one node, or wait.
    StrictPack,
    /// Every bundle on a different node, or wait.
    StrictSpread,
}

/// A bundle hold request or release, node side (JSON: rare and small).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct BundleHold {
    pub pg: u128,
    /// (bundle index, CPUs).
    pub bundles: Vec<(u32, f64)>,
}

/// A placement group, as its creator holds it. Cheap to clone.
#[derive(Clone)]
pub struct PlacementGroup {
    inner: Arc<PgInner>,
}

struct PgInner {
    id: u128,
    bundles: Vec<Resources>,
    /// Node of each bundle, once reserved.
    placement: Mutex<Option<Vec<u128>>>,
    strategy: PlacementStrategy,
    /// Completes when every bundle is held; replaced by a fresh one while lost bundles are placed again.
    ready: Mutex<Arc<Entry>>,
    removed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for PlacementGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PlacementGroup({:x}, {} bundles)",
            self.inner.id >> 80,
            self.inner.bundles.len()
        )
    }
}

impl PlacementGroup {
    /// The group's id (use it in `Strategy::PlacementGroup`).
    pub fn id(&self) -> u128 {
        self.inner.id
    }

    /// Waits until every bundle is reserved; `false` if `timeout` passed first.
    pub fn wait(&self, timeout: Duration) -> bool {
        let ready = self.inner.ready.lock().clone();
        runtime::wait_blocking(&ready, Some(Instant::now() + timeout)).is_ok()
    }

    /// The node (short id) of each bundle, once reserved.
    pub fn bundle_nodes(&self) -> Option<Vec<String>> {
        self.inner
            .placement
            .lock()
            .as_ref()
            .map(|p| p.iter().map(|n| runtime::short(*n)).collect())
    }

    /// Resolves the node that hosts `bundle` (any bundle: the first), if the group is reserved.
    pub(crate) fn node_of(rt: &Runtime, pg: u128, bundle: Option<usize>) -> Option<u128> {
        let g = rt.pgs.get(&pg)?;
        let placement = g.inner.placement.lock();
        let p = placement.as_ref()?;
        p.get(bundle.unwrap_or(0)).copied().filter(|n| *n != 0)
    }
}

fn to_scheduler(s: PlacementStrategy) -> PgStrategy {
    match s {
        PlacementStrategy::Pack => PgStrategy::Pack,
        PlacementStrategy::Spread => PgStrategy::Spread,
        PlacementStrategy::StrictPack => PgStrategy::StrictPack,
        PlacementStrategy::StrictSpread => PgStrategy::StrictSpread,
    }
}

/// Creates a placement group; it is reserved in the background (see [`PlacementGroup::wait`]).
///
/// ```
/// use std::time::Duration;
/// use oxray::pg::{PlacementStrategy, placement_group, remove_placement_group};
/// oxray::init()?;
/// let one_cpu = oxray::Resources { num_cpus: 1.0, ..Default::default() };
/// let pg = placement_group(vec![one_cpu], PlacementStrategy::Pack)?;
/// assert!(pg.wait(Duration::from_secs(10)));
/// remove_placement_group(&pg)?;
/// # Ok::<(), oxray::Error>(())
/// ```
pub fn placement_group(
    bundles: Vec<Resources>,
    strategy: PlacementStrategy,
) -> Result<PlacementGroup> {
    if bundles.is_empty() || bundles.len() > oxray_scheduler::pg::MAX_BUNDLES {
        return Err(Error::InvalidArgument(format!(
            "a placement group has 1 to {} bundles",
            oxray_scheduler::pg::MAX_BUNDLES
        )));
    }
    let rt = runtime::current()?;
    let id = rand_u128();
    let pg = PlacementGroup {
        inner: Arc::new(PgInner {
            id,
            bundles,
            placement: Mutex::new(None),
            strategy,
            ready: Mutex::new(Entry::new(ObjectId::random())),
            removed: std::sync::atomic::AtomicBool::new(false),
        }),
    };
    rt.pgs.insert(id, pg.clone());
    let (rt2, g) = (rt.clone(), pg.clone());
    rt.tokio
        .spawn(async move { reserve(rt2, g, strategy).await });
    Ok(pg)
}

/// Frees the group's resources and kills the actors placed in it.
///
/// As Ray's, removal is asynchronous across nodes: this returns once each node's release is on its way (bundles on
/// this node are freed before it returns), and a node frees its bundles when the release arrives. A release that
/// fails is tried again (three tries in all, 100 ms apart) unless its node is declared dead, which frees them too.
pub fn remove_placement_group(pg: &PlacementGroup) -> Result<()> {
    let rt = runtime::current()?;
    pg.inner
        .removed
        .store(true, std::sync::atomic::Ordering::Release);
    rt.pgs.remove(&pg.inner.id);
    pg.inner.ready.lock().complete(Err(Error::Cancelled));
    let placement = pg.inner.placement.lock().take();
    let Some(nodes) = placement else {
        return Ok(());
    };
    // 0: a bundle lost with its node and not placed again; nothing holds it.
    let per_node = by_node(
        pg,
        nodes.iter().copied().enumerate().filter(|(_, n)| *n != 0),
    );
    let id = pg.inner.id;
    let mut remote = Vec::new();
    for (node, bundles) in per_node {
        let hold = BundleHold { pg: id, bundles };
        if node == rt.node {
            rt.release_bundles(&hold)?;
        } else {
            remote.push((node, hold));
        }
    }
    if remote.is_empty() {
        return Ok(());
    }
    // A round trip per group removed made removal the slowest part of the placement-group benchmark row, and the
    // caller has nothing to do with the answer.
    let rt2 = rt.clone();
    rt.tokio.spawn(async move {
        for (node, hold) in remote {
            release_on(&rt2, node, &hold).await;
        }
    });
    Ok(())
}

/// Sends `node` the release of `hold`: three tries, 100 ms apart, none once the node is declared dead (its death
/// frees the bundles).
async fn release_on(rt: &Arc<Runtime>, node: u128, hold: &BundleHold) {
    for attempt in 1..=3 {
        let Err(e) = send_hold(rt, node, kind::PG_RELEASE, hold).await else {
            return;
        };
        if rt.cluster.get().is_some_and(|cl| cl.node_known_dead(node)) {
            return;
        }
        if attempt == 3 {
            let pg = format!("{:x}", hold.pg >> 80);
            return tracing::warn!(pg = %pg, node = %format!("{node:x}"), cause = %e, "placement group bundles not released");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Asks `node` (possibly this one) to hold or release bundles.
async fn send_hold(rt: &Arc<Runtime>, node: u128, k: u16, hold: &BundleHold) -> Result<()> {
    if node == rt.node {
        return if k == kind::PG_PREPARE {
            rt.hold_bundles(hold)
        } else {
            rt.release_bundles(hold)
        };
    }
    let cl = rt.cluster.get().ok_or(Error::NotInitialized)?;
    let body =
        Bytes::from(serde_json::to_vec(hold).map_err(|e| Error::Serialization(e.to_string()))?);
    cl.control(NodeId(node), k, body).await.map(|_| ())
}

async fn reserve(rt: Arc<Runtime>, pg: PlacementGroup, strategy: PlacementStrategy) {
    let mut logged = false;
    loop {
        if pg.inner.removed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let nodes: Option<Vec<u128>> = match rt.cluster.get() {
            None => Some(vec![rt.node; pg.inner.bundles.len()]),
            Some(cl) => {
                let spec = PlacementGroupSpec {
                    id: PlacementGroupId(pg.inner.id),
                    bundles: pg
                        .inner
                        .bundles
                        .iter()
                        .map(crate::cluster::demand)
                        .collect(),
                    strategy: to_scheduler(strategy),
                };
                match cl.plan_group(&rt, &spec) {
                    Ok(n) => Some(n.into_iter().map(|n| n.0).collect()),
                    Err(e) => {
                        if !logged {
                            tracing::warn!(pg = %format!("{:x}", pg.inner.id >> 80), cause = %e, "placement group waits for resources");
                            logged = true;
                        }
                        None
                    }
                }
            }
        };
        if let Some(nodes) = nodes {
            let placed = nodes.iter().copied().enumerate();
            if let Some(held) = hold_all(&rt, &pg, by_node(&pg, placed)).await {
                if !pg.inner.removed.load(std::sync::atomic::Ordering::Acquire) {
                    *pg.inner.placement.lock() = Some(nodes);
                    pg.inner.ready.lock().complete(Ok(Bytes::new()));
                    return;
                }
                release_all(&rt, held).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A node died: every placement group this process created with bundles there gets those bundles placed again.
/// Bundles on surviving nodes keep their holds and what runs in them; the lost ones are planned on the current view
/// with the group's strategy kept (STRICT_SPREAD avoids the group's other nodes, STRICT_PACK stays on its node).
/// Until they are held again, `wait` blocks and work aimed at a lost bundle is refused as "not reserved yet"; what
/// ran in the lost bundles died with their node.
pub(crate) fn node_died(rt: &Arc<Runtime>, node: u128) {
    for g in rt.pgs.iter() {
        let pg = g.value().clone();
        let lost: Vec<usize> = match pg.inner.placement.lock().as_mut() {
            Some(nodes) => {
                let lost: Vec<usize> = (0..nodes.len()).filter(|i| nodes[*i] == node).collect();
                // 0: not held anywhere until placed again.
                for i in &lost {
                    nodes[*i] = 0;
                }
                lost
            }
            None => continue,
        };
        if lost.is_empty() {
            continue;
        }
        *pg.inner.ready.lock() = Entry::new(ObjectId::random());
        tracing::warn!(pg = %format!("{:x}", pg.inner.id >> 80), bundles = lost.len(), "placement group lost a node; placing those bundles again");
        rt.tokio.spawn(replace_lost(rt.clone(), pg, lost));
    }
}

async fn replace_lost(rt: Arc<Runtime>, pg: PlacementGroup, lost: Vec<usize>) {
    let mut logged = false;
    loop {
        if pg.inner.removed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let Some(cl) = rt.cluster.get() else { return };
        let kept: Vec<u128> = pg
            .inner
            .placement
            .lock()
            .as_ref()
            .map(|nodes| {
                nodes
                    .iter()
                    .enumerate()
                    .filter(|(i, n)| !lost.contains(i) && **n != 0)
                    .map(|(_, n)| *n)
                    .collect()
            })
            .unwrap_or_default();
        let spec = PlacementGroupSpec {
            id: PlacementGroupId(pg.inner.id),
            bundles: lost
                .iter()
                .map(|i| crate::cluster::demand(&pg.inner.bundles[*i]))
                .collect(),
            strategy: to_scheduler(pg.inner.strategy),
        };
        let (exclude, only) = match pg.inner.strategy {
            PlacementStrategy::StrictSpread => (kept.clone(), None),
            PlacementStrategy::StrictPack => (Vec::new(), kept.first().copied()),
            _ => (Vec::new(), None),
        };
        match cl.plan_group_within(&rt, &spec, &exclude, only) {
            Ok(targets) => {
                let placed = targets.iter().enumerate().map(|(k, n)| (lost[k], n.0));
                if let Some(held) = hold_all(&rt, &pg, by_node(&pg, placed)).await {
                    if !pg.inner.removed.load(std::sync::atomic::Ordering::Acquire) {
                        if let Some(nodes) = pg.inner.placement.lock().as_mut() {
                            for (k, n) in targets.iter().enumerate() {
                                nodes[lost[k]] = n.0;
                            }
                        }
                        pg.inner.ready.lock().complete(Ok(Bytes::new()));
                        return;
                    }
                    release_all(&rt, held).await;
                }
            }
            Err(e) => {
                if !logged {
                    tracing::warn!(pg = %format!("{:x}", pg.inner.id >> 80), cause = %e, "lost bundles wait for resources");
                    logged = true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Bundle holds grouped by node, from (bundle index, node) pairs.
fn by_node(
    pg: &PlacementGroup,
    placed: impl Iterator<Item = (usize, u128)>,
) -> HashMap<u128, Vec<(u32, f64)>> {
    let mut per_node: HashMap<u128, Vec<(u32, f64)>> = HashMap::new();
    for (i, n) in placed {
        per_node
            .entry(n)
            .or_default()
            .push((i as u32, pg.inner.bundles[i].num_cpus));
    }
    per_node
}

/// Phase one of a reservation: every node holds its bundles. Returns the holds, or `None` after undoing the holds
/// already made if any node refused.
async fn hold_all(
    rt: &Arc<Runtime>,
    pg: &PlacementGroup,
    per_node: HashMap<u128, Vec<(u32, f64)>>,
) -> Option<Vec<(u128, BundleHold)>> {
    let mut held = Vec::new();
    for (node, bundles) in per_node {
        let hold = BundleHold {
            pg: pg.inner.id,
            bundles,
        };
        if send_hold(rt, node, kind::PG_PREPARE, &hold).await.is_err() {
            release_all(rt, held).await;
            return None;
        }
        held.push((node, hold));
    }
    Some(held)
}

async fn release_all(rt: &Arc<Runtime>, held: Vec<(u128, BundleHold)>) {
    for (node, hold) in held {
        let _ = send_hold(rt, node, kind::PG_RELEASE, &hold).await;
    }
}

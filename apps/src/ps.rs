//! A parameter server, as pure functions: linear or logistic regression on generated data, with
//! gradients computed by workers on shards and applied by a server.
//!
//! What this is: [`DataSpec`] describes a synthetic data set (a hidden true weight vector, Gaussian
//! features, targets from a linear model with noise or from a logistic model), and every shard is
//! generated from the spec and its index alone, so a worker actor builds its shard locally and only
//! the spec crosses the wire. [`Shard::gradient`] is the worker's job; [`ParameterServer`] averages
//! gradients (synchronous) or applies them one by one (asynchronous, with a staleness bound) and
//! versions the weights. [`train_sync`] runs the whole loop in one thread for tests and as the
//! reference for the distributed example.
//!
//! What this is not: no I/O, no threads, no clock; plain gradient descent (no momentum), dense
//! `f32` features only.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Most features per example (bounds memory per shard and per gradient message).
pub const MAX_DIM: u32 = 1 << 16;
/// Most examples per shard.
pub const MAX_SHARD_ROWS: u32 = 1 << 22;

/// Errors of the parameter-server model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PsError {
    /// A data spec field is out of range; the message names it.
    #[error("invalid data spec: {0}")]
    InvalidSpec(&'static str),
    /// A shard index not below the shard count.
    #[error("shard {index} of {count} does not exist")]
    NoSuchShard {
        /// Requested index.
        index: u32,
        /// Number of shards.
        count: u32,
    },
    /// Weights or a gradient of the wrong length (from another model or a corrupt message).
    #[error("expected {expected} values, got {got}")]
    Length {
        /// The model's dimension.
        expected: usize,
        /// What arrived.
        got: usize,
    },
    /// A gradient, weight or learning rate is NaN or infinite.
    #[error("non-finite value in a gradient or the weights")]
    NonFinite,
    /// A gradient computed against weights too old to apply (asynchronous mode). Remedy: the
    /// worker fetches the current weights and recomputes; retryable.
    #[error(
        "gradient from version {got} is older than the staleness bound allows (current {current}, bound {bound})"
    )]
    Stale {
        /// Version the gradient was computed at.
        got: u64,
        /// Server's version.
        current: u64,
        /// Largest accepted `current - got`.
        bound: u64,
    },
    /// A gradient claims a version the server has not reached (forged or from another server).
    #[error("gradient from future version {got} (current {current})")]
    FutureVersion {
        /// Version the gradient claims.
        got: u64,
        /// Server's version.
        current: u64,
    },
    /// `apply_sync` got no gradients.
    #[error("no gradients to apply")]
    Empty,
}

/// The kind of model and loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ModelKind {
    /// Least squares: loss ½(w·x − y)².
    Linear,
    /// Logistic regression with labels in {0, 1}: cross-entropy of σ(w·x).
    Logistic,
}

/// A synthetic data set: everything a worker needs to generate its shard.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct DataSpec {
    /// Model and loss.
    pub kind: ModelKind,
    /// Features per example (a bias feature of 1 is the last of them).
    pub dim: u32,
    /// Number of shards.
    pub shards: u32,
    /// Examples per shard.
    pub rows_per_shard: u32,
    /// Standard deviation of the label noise (linear model only).
    pub noise: f32,
    /// Seed of the true weights and of every shard.
    pub seed: u64,
}

impl DataSpec {
    /// Checks the limits.
    ///
    /// # Errors
    /// [`PsError::InvalidSpec`].
    pub fn validate(&self) -> Result<(), PsError> {
        if self.dim < 2 || self.dim > MAX_DIM {
            return Err(PsError::InvalidSpec("dim must be in 2..=65536"));
        }
        if self.shards == 0 {
            return Err(PsError::InvalidSpec("shards must be positive"));
        }
        if self.rows_per_shard == 0 || self.rows_per_shard > MAX_SHARD_ROWS {
            return Err(PsError::InvalidSpec(
                "rows_per_shard must be in 1..=4194304",
            ));
        }
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return Err(PsError::InvalidSpec(
                "noise must be finite and non-negative",
            ));
        }
        if u64::from(self.dim) * u64::from(self.rows_per_shard) > 1 << 28 {
            return Err(PsError::InvalidSpec(
                "dim * rows_per_shard must be at most 2^28",
            ));
        }
        Ok(())
    }

    /// The weights the data were generated from (the best a model can learn, up to noise).
    pub fn true_weights(&self) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(self.seed ^ 0x7472_7565);
        let mut w = vec![0.0; self.dim as usize];
        crate::es::fill_normal(&mut rng, &mut w);
        w
    }

    /// Generates shard `index` (deterministic in the spec and the index).
    ///
    /// # Errors
    /// [`PsError::InvalidSpec`] or [`PsError::NoSuchShard`].
    pub fn shard(&self, index: u32) -> Result<Shard, PsError> {
        self.validate()?;
        if index >= self.shards {
            return Err(PsError::NoSuchShard {
                index,
                count: self.shards,
            });
        }
        let d = self.dim as usize;
        let n = self.rows_per_shard as usize;
        let truth = self.true_weights();
        let mut rng =
            StdRng::seed_from_u64(self.seed.wrapping_add(1 + u64::from(index)).rotate_left(17));
        let mut x = vec![0.0f32; n * d];
        let mut y = vec![0.0f32; n];
        let mut noise = [0.0f32; 1];
        for (row, label) in x.chunks_mut(d).zip(&mut y) {
            crate::es::fill_normal_with(&mut rng, &mut row[..d - 1]);
            row[d - 1] = 1.0;
            let z = dot(&truth, row);
            *label = match self.kind {
                ModelKind::Linear => {
                    crate::es::fill_normal_with(&mut rng, &mut noise);
                    z + self.noise * noise[0]
                }
                ModelKind::Logistic => f32::from(rng.random::<f32>() < sigmoid(z)),
            };
        }
        Ok(Shard {
            kind: self.kind,
            dim: d,
            x,
            y,
        })
    }
}

/// One worker's examples, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Shard {
    kind: ModelKind,
    dim: usize,
    x: Vec<f32>,
    y: Vec<f32>,
}

/// What a worker sends to the server.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Gradient {
    /// Mean gradient of the loss over the examples used.
    pub grad: Vec<f32>,
    /// Mean loss over those examples, at the weights used.
    pub loss: f32,
    /// Number of examples used.
    pub count: u32,
    /// Server version of the weights the gradient was computed at.
    pub version: u64,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// Cross-entropy of a logit `z` against a 0/1 label, computed without overflow.
fn logistic_loss(z: f32, y: f32) -> f32 {
    // log(1 + e^z) − y·z, with log(1 + e^z) = max(z, 0) + log(1 + e^−|z|).
    z.max(0.0) + (-z.abs()).exp().ln_1p() - y * z
}

impl Shard {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether the shard has no examples (never, for a validated spec).
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    fn check(&self, weights: &[f32]) -> Result<(), PsError> {
        if weights.len() != self.dim {
            return Err(PsError::Length {
                expected: self.dim,
                got: weights.len(),
            });
        }
        if !weights.iter().all(|w| w.is_finite()) {
            return Err(PsError::NonFinite);
        }
        Ok(())
    }

    /// Mean loss at `weights` over the whole shard.
    ///
    /// # Errors
    /// [`PsError::Length`] or [`PsError::NonFinite`] for weights that do not fit.
    pub fn loss(&self, weights: &[f32]) -> Result<f32, PsError> {
        Ok(self.gradient(weights, 0, None)?.loss)
    }

    /// The worker's job: mean gradient and loss at `weights` (server version `version`), over the
    /// whole shard or over a minibatch of `batch.1` examples drawn with seed `batch.0`.
    ///
    /// # Errors
    /// [`PsError::Length`] or [`PsError::NonFinite`] for weights that do not fit.
    pub fn gradient(
        &self,
        weights: &[f32],
        version: u64,
        batch: Option<(u64, u32)>,
    ) -> Result<Gradient, PsError> {
        self.check(weights)?;
        let d = self.dim;
        let mut grad = vec![0.0f64; d];
        let mut loss = 0.0f64;
        let mut count = 0u32;
        let mut visit = |i: usize| {
            let row = &self.x[i * d..(i + 1) * d];
            let z = dot(weights, row);
            let (l, r) = match self.kind {
                ModelKind::Linear => (0.5 * (z - self.y[i]).powi(2), z - self.y[i]),
                ModelKind::Logistic => (logistic_loss(z, self.y[i]), sigmoid(z) - self.y[i]),
            };
            loss += f64::from(l);
            for (g, x) in grad.iter_mut().zip(row) {
                *g += f64::from(r * x);
            }
            count += 1;
        };
        match batch {
            None => (0..self.len()).for_each(&mut visit),
            // An empty shard cannot be built from a validated spec; the guard keeps the range non-empty.
            Some(_) if self.is_empty() => {}
            Some((seed, size)) => {
                let mut rng = StdRng::seed_from_u64(seed);
                for _ in 0..size.max(1) {
                    visit(rng.random_range(0..self.len()));
                }
            }
        }
        let n = f64::from(count.max(1));
        Ok(Gradient {
            grad: grad.into_iter().map(|g| (g / n) as f32).collect(),
            loss: (loss / n) as f32,
            count,
            version,
        })
    }
}

/// The server: current weights, their version, the step size and the staleness bound.
#[derive(Debug, Clone, PartialEq)]
pub struct ParameterServer {
    weights: Vec<f32>,
    version: u64,
    lr: f32,
    max_staleness: u64,
}

impl ParameterServer {
    /// A server for `dim` weights starting at zero, applying steps of size `lr`, accepting
    /// asynchronous gradients at most `max_staleness` versions old.
    ///
    /// # Errors
    /// [`PsError::NonFinite`] for a non-finite or non-positive `lr`; [`PsError::InvalidSpec`] for a
    /// `dim` outside `1..=MAX_DIM`.
    pub fn new(dim: u32, lr: f32, max_staleness: u64) -> Result<ParameterServer, PsError> {
        if dim == 0 || dim > MAX_DIM {
            return Err(PsError::InvalidSpec("dim must be in 1..=65536"));
        }
        if !(lr.is_finite() && lr > 0.0) {
            return Err(PsError::NonFinite);
        }
        Ok(ParameterServer {
            weights: vec![0.0; dim as usize],
            version: 0,
            lr,
            max_staleness,
        })
    }

    /// The current weights (what workers fetch).
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }

    /// Number of updates applied so far.
    pub fn version(&self) -> u64 {
        self.version
    }

    fn check(&self, g: &Gradient) -> Result<(), PsError> {
        if g.grad.len() != self.weights.len() {
            return Err(PsError::Length {
                expected: self.weights.len(),
                got: g.grad.len(),
            });
        }
        if !(g.grad.iter().all(|v| v.is_finite()) && g.loss.is_finite()) {
            return Err(PsError::NonFinite);
        }
        Ok(())
    }

    /// Synchronous step: averages `grads` (weighted by their example counts), all computed at the
    /// current version, and takes one step. Returns the new version.
    ///
    /// # Errors
    /// [`PsError::Empty`], [`PsError::Length`], [`PsError::NonFinite`], or [`PsError::Stale`] /
    /// [`PsError::FutureVersion`] for a gradient of another version; nothing changes on error.
    pub fn apply_sync(&mut self, grads: &[Gradient]) -> Result<u64, PsError> {
        if grads.is_empty() {
            return Err(PsError::Empty);
        }
        for g in grads {
            self.check(g)?;
            if g.version != self.version {
                return Err(self.version_error(g.version, 0));
            }
        }
        let total: f64 = grads.iter().map(|g| f64::from(g.count.max(1))).sum();
        for (i, w) in self.weights.iter_mut().enumerate() {
            let avg: f64 = grads
                .iter()
                .map(|g| f64::from(g.grad[i]) * f64::from(g.count.max(1)))
                .sum::<f64>()
                / total;
            *w -= self.lr * avg as f32;
        }
        self.version += 1;
        Ok(self.version)
    }

    /// Asynchronous step: applies one gradient at once if it is at most `max_staleness` versions
    /// old. Returns the new version.
    ///
    /// # Errors
    /// [`PsError::Stale`] (retryable: recompute at the current weights), [`PsError::FutureVersion`],
    /// [`PsError::Length`], [`PsError::NonFinite`]; nothing changes on error.
    pub fn apply_async(&mut self, g: &Gradient) -> Result<u64, PsError> {
        self.check(g)?;
        if g.version > self.version || self.version - g.version > self.max_staleness {
            return Err(self.version_error(g.version, self.max_staleness));
        }
        for (w, d) in self.weights.iter_mut().zip(&g.grad) {
            *w -= self.lr * d;
        }
        self.version += 1;
        Ok(self.version)
    }

    fn version_error(&self, got: u64, bound: u64) -> PsError {
        if got > self.version {
            PsError::FutureVersion {
                got,
                current: self.version,
            }
        } else {
            PsError::Stale {
                got,
                current: self.version,
                bound,
            }
        }
    }
}

/// Synchronous training in one thread: every step, each shard computes a full-shard gradient at the
/// current weights and the server averages them. Returns the server and the mean loss before each
/// step (the loss curve).
///
/// # Errors
/// [`PsError::InvalidSpec`] for a bad spec or `lr`.
pub fn train_sync(
    spec: &DataSpec,
    lr: f32,
    steps: u32,
) -> Result<(ParameterServer, Vec<f32>), PsError> {
    let shards = (0..spec.shards)
        .map(|i| spec.shard(i))
        .collect::<Result<Vec<_>, _>>()?;
    let mut server = ParameterServer::new(spec.dim, lr, 0)?;
    let mut losses = Vec::with_capacity(steps as usize);
    for _ in 0..steps {
        let grads = shards
            .iter()
            .map(|s| s.gradient(server.weights(), server.version(), None))
            .collect::<Result<Vec<_>, _>>()?;
        losses.push(grads.iter().map(|g| g.loss).sum::<f32>() / grads.len() as f32);
        server.apply_sync(&grads)?;
    }
    Ok((server, losses))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: ModelKind) -> DataSpec {
        DataSpec {
            kind,
            dim: 8,
            shards: 4,
            rows_per_shard: 500,
            noise: 0.1,
            seed: 11,
        }
    }

    #[test]
    fn shards_are_deterministic_and_distinct() {
        let s = spec(ModelKind::Linear);
        assert_eq!(s.shard(2).unwrap(), s.shard(2).unwrap());
        assert_ne!(s.shard(1).unwrap(), s.shard(2).unwrap());
        assert_eq!(s.shard(4), Err(PsError::NoSuchShard { index: 4, count: 4 }));
        assert!(matches!(
            DataSpec {
                dim: 1,
                ..s.clone()
            }
            .shard(0),
            Err(PsError::InvalidSpec(_))
        ));
        assert!(matches!(
            DataSpec {
                rows_per_shard: 0,
                ..s.clone()
            }
            .shard(0),
            Err(PsError::InvalidSpec(_))
        ));
        assert!(matches!(
            DataSpec {
                noise: f32::NAN,
                ..s
            }
            .shard(0),
            Err(PsError::InvalidSpec(_))
        ));
    }

    #[test]
    fn linear_gradient_by_hand() {
        // One example x = (2, 1), y = 3, w = (1, 0): z = 2, r = −1, loss ½, gradient r·x = (−2, −1).
        let shard = Shard {
            kind: ModelKind::Linear,
            dim: 2,
            x: vec![2.0, 1.0],
            y: vec![3.0],
        };
        let g = shard.gradient(&[1.0, 0.0], 7, None).unwrap();
        assert_eq!(
            g,
            Gradient {
                grad: vec![-2.0, -1.0],
                loss: 0.5,
                count: 1,
                version: 7
            }
        );
        // Logistic at w = 0: σ = ½, loss ln 2, gradient (½ − y)·x.
        let shard = Shard {
            kind: ModelKind::Logistic,
            dim: 2,
            x: vec![2.0, 1.0],
            y: vec![1.0],
        };
        let g = shard.gradient(&[0.0, 0.0], 0, None).unwrap();
        assert!((g.loss - std::f32::consts::LN_2).abs() < 1e-6);
        assert_eq!(g.grad, vec![-1.0, -0.5]);
        assert_eq!(
            shard.gradient(&[0.0], 0, None),
            Err(PsError::Length {
                expected: 2,
                got: 1
            })
        );
        assert_eq!(
            shard.gradient(&[f32::NAN, 0.0], 0, None),
            Err(PsError::NonFinite)
        );
    }

    #[test]
    fn logistic_loss_is_stable_for_large_logits() {
        assert!((logistic_loss(100.0, 1.0)).abs() < 1e-6);
        assert!((logistic_loss(100.0, 0.0) - 100.0).abs() < 1e-3);
        assert!((logistic_loss(-100.0, 0.0)).abs() < 1e-6);
        assert!(logistic_loss(-1000.0, 1.0).is_finite());
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for kind in [ModelKind::Linear, ModelKind::Logistic] {
            let shard = spec(kind).shard(0).unwrap();
            let w: Vec<f32> = (0..8).map(|i| 0.1 * i as f32 - 0.3).collect();
            let g = shard.gradient(&w, 0, None).unwrap();
            for i in 0..8 {
                let h = 1e-2;
                let mut wp = w.clone();
                wp[i] += h;
                let mut wm = w.clone();
                wm[i] -= h;
                let fd = (shard.loss(&wp).unwrap() - shard.loss(&wm).unwrap()) / (2.0 * h);
                assert!(
                    (fd - g.grad[i]).abs() < 2e-2 * (1.0 + fd.abs()),
                    "{kind:?} {i}: {fd} vs {}",
                    g.grad[i]
                );
            }
        }
    }

    #[test]
    fn sync_training_drives_the_loss_down_and_finds_the_weights() {
        let s = spec(ModelKind::Linear);
        let (server, losses) = train_sync(&s, 0.3, 60).unwrap();
        assert_eq!(server.version(), 60);
        assert!(
            losses[59] < 0.02 * losses[0],
            "{} -> {}",
            losses[0],
            losses[59]
        );
        // Noise σ = 0.1 leaves a loss floor of about σ²/2 = 0.005.
        assert!(losses[59] < 0.01, "{}", losses[59]);
        let err: f32 = server
            .weights()
            .iter()
            .zip(s.true_weights())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 0.05, "max weight error {err}");

        let s = spec(ModelKind::Logistic);
        let (server, losses) = train_sync(&s, 1.0, 100).unwrap();
        assert!(
            losses[99] < 0.6 * losses[0],
            "{} -> {}",
            losses[0],
            losses[99]
        );
        // The learned direction agrees with the true one.
        let t = s.true_weights();
        let cos = dot(server.weights(), &t)
            / (dot(server.weights(), server.weights()).sqrt() * dot(&t, &t).sqrt());
        assert!(cos > 0.9, "cosine {cos}");
    }

    #[test]
    fn async_server_enforces_staleness() {
        let s = spec(ModelKind::Linear);
        let shard = s.shard(0).unwrap();
        let mut server = ParameterServer::new(8, 0.1, 2).unwrap();
        let g0 = shard
            .gradient(server.weights(), server.version(), Some((1, 32)))
            .unwrap();
        assert_eq!(g0.count, 32);
        assert_eq!(server.apply_async(&g0), Ok(1));
        assert_eq!(server.apply_async(&g0), Ok(2));
        assert_eq!(server.apply_async(&g0), Ok(3));
        let before = server.clone();
        assert_eq!(
            server.apply_async(&g0),
            Err(PsError::Stale {
                got: 0,
                current: 3,
                bound: 2
            })
        );
        let future = Gradient {
            version: 9,
            ..g0.clone()
        };
        assert_eq!(
            server.apply_async(&future),
            Err(PsError::FutureVersion { got: 9, current: 3 })
        );
        let short = Gradient {
            grad: vec![0.0; 3],
            ..g0.clone()
        };
        assert!(matches!(
            server.apply_async(&short),
            Err(PsError::Length { .. })
        ));
        let nan = Gradient {
            grad: vec![f32::NAN; 8],
            version: 3,
            ..g0.clone()
        };
        assert_eq!(server.apply_async(&nan), Err(PsError::NonFinite));
        assert_eq!(server, before);
        // Synchronous steps need the current version exactly.
        assert!(matches!(
            server.apply_sync(&[g0]),
            Err(PsError::Stale { .. })
        ));
        assert_eq!(server.apply_sync(&[]), Err(PsError::Empty));
        assert!(ParameterServer::new(8, f32::INFINITY, 0).is_err());
        assert!(ParameterServer::new(0, 0.1, 0).is_err());
    }

    #[test]
    fn async_minibatch_training_converges() {
        let s = spec(ModelKind::Linear);
        let shards: Vec<Shard> = (0..4).map(|i| s.shard(i).unwrap()).collect();
        let mut server = ParameterServer::new(8, 0.05, 4).unwrap();
        let start = shards[0].loss(server.weights()).unwrap();
        // Four workers fetch weights in turn and their gradients land one round later (staleness up to 3).
        let mut in_flight: Vec<Gradient> = Vec::new();
        for step in 0..400u64 {
            let w = (step % 4) as usize;
            in_flight.push(
                shards[w]
                    .gradient(server.weights(), server.version(), Some((step, 16)))
                    .unwrap(),
            );
            if in_flight.len() == 4 {
                for g in in_flight.drain(..) {
                    server.apply_async(&g).unwrap();
                }
            }
        }
        let end = shards[0].loss(server.weights()).unwrap();
        assert!(end < 0.02 * start, "{start} -> {end}");
    }

    #[test]
    fn gradient_round_trips_through_rkyv() {
        let g = Gradient {
            grad: vec![1.0, -2.5],
            loss: 0.25,
            count: 3,
            version: 5,
        };
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&g).unwrap();
        let a = rkyv::access::<ArchivedGradient, rkyv::rancor::Error>(&bytes).unwrap();
        assert_eq!(a.grad.len(), 2);
        assert_eq!(
            rkyv::deserialize::<Gradient, rkyv::rancor::Error>(a).unwrap(),
            g
        );
    }
}

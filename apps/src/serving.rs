//! A small multi-layer perceptron for the model-serving example: a batch of inputs in, a batch of
//! outputs out.
//!
//! What this is: [`Mlp`] (layer sizes plus one flat `f32` parameter vector, rkyv-archivable so a
//! model can be put in the object store once and fetched by every replica), [`Mlp::forward_batch`]
//! over row-major batches with ReLU hidden layers and a linear output, and [`softmax_rows`] /
//! [`argmax_rows`] to turn logits into answers.
//!
//! What this is not: no training, no SIMD or BLAS (plain loops the compiler vectorises), no GPU.
//! NaN inputs give NaN outputs rather than errors: a request's numbers are the caller's business,
//! only shapes are checked.

use rand::SeedableRng;
use rand::rngs::StdRng;

/// Most layers (counting input and output sizes) a model may have.
pub const MAX_LAYERS: usize = 16;
/// Widest layer.
pub const MAX_WIDTH: u32 = 16_384;
/// Most parameters (256 MiB of `f32`).
pub const MAX_PARAMS: usize = 1 << 26;
/// Most rows in one `forward_batch` call.
pub const MAX_BATCH: usize = 1 << 16;

/// Errors of the serving model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ServingError {
    /// Layer sizes out of range; the message says which limit.
    #[error("invalid model shape: {0}")]
    InvalidShape(&'static str),
    /// The parameter vector does not fit the layer sizes (a model from elsewhere, or corrupt).
    #[error("expected {expected} parameters, got {got}")]
    ParamsLength {
        /// What the sizes need.
        expected: usize,
        /// What was given.
        got: usize,
    },
    /// A model parameter is NaN or infinite.
    #[error("model parameters contain a non-finite value")]
    NonFiniteParams,
    /// The input is not `batch × input_dim` values. Remedy: send whole rows of the model's width.
    #[error("expected {expected} input values, got {got}")]
    InputLength {
        /// `batch * input_dim`.
        expected: usize,
        /// What arrived.
        got: usize,
    },
    /// More rows than [`MAX_BATCH`]. Remedy: split the request.
    #[error("batch of {batch} rows exceeds the limit of {max}")]
    BatchTooLarge {
        /// Requested rows.
        batch: usize,
        /// [`MAX_BATCH`].
        max: usize,
    },
}

/// A fully connected network: `sizes[0]` inputs, ReLU hidden layers, `sizes[last]` linear outputs.
/// Parameters are stored layer by layer, each as a row-major `out × in` weight matrix then `out`
/// biases.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Mlp {
    sizes: Vec<u32>,
    params: Vec<f32>,
}

fn params_for(sizes: &[u32]) -> Result<usize, ServingError> {
    if sizes.len() < 2 || sizes.len() > MAX_LAYERS {
        return Err(ServingError::InvalidShape("between 2 and 16 layer sizes"));
    }
    if sizes.iter().any(|&s| s == 0 || s > MAX_WIDTH) {
        return Err(ServingError::InvalidShape("every layer size in 1..=16384"));
    }
    let n: usize = sizes
        .windows(2)
        .map(|w| (w[0] as usize + 1) * w[1] as usize)
        .sum();
    if n > MAX_PARAMS {
        return Err(ServingError::InvalidShape("at most 2^26 parameters"));
    }
    Ok(n)
}

impl Mlp {
    /// A model from layer sizes and parameters.
    ///
    /// # Errors
    /// [`ServingError::InvalidShape`], [`ServingError::ParamsLength`] or
    /// [`ServingError::NonFiniteParams`].
    pub fn new(sizes: &[u32], params: Vec<f32>) -> Result<Mlp, ServingError> {
        let expected = params_for(sizes)?;
        if params.len() != expected {
            return Err(ServingError::ParamsLength {
                expected,
                got: params.len(),
            });
        }
        if !params.iter().all(|p| p.is_finite()) {
            return Err(ServingError::NonFiniteParams);
        }
        Ok(Mlp {
            sizes: sizes.to_vec(),
            params,
        })
    }

    /// A model with He-initialised weights (N(0, 2/fan_in)) drawn from `seed` and zero biases:
    /// a stand-in for a trained model in demos and benchmarks.
    ///
    /// # Errors
    /// [`ServingError::InvalidShape`].
    pub fn random(sizes: &[u32], seed: u64) -> Result<Mlp, ServingError> {
        let n = params_for(sizes)?;
        let mut params = vec![0.0f32; n];
        let mut rng = StdRng::seed_from_u64(seed);
        let mut at = 0;
        for w in sizes.windows(2) {
            let (fan_in, out) = (w[0] as usize, w[1] as usize);
            let weights = &mut params[at..at + fan_in * out];
            crate::es::fill_normal(&mut rng, weights);
            let scale = (2.0 / fan_in as f32).sqrt();
            weights.iter_mut().for_each(|v| *v *= scale);
            at += (fan_in + 1) * out;
        }
        Ok(Mlp {
            sizes: sizes.to_vec(),
            params,
        })
    }

    /// Layer sizes, input first.
    pub fn sizes(&self) -> &[u32] {
        &self.sizes
    }

    /// The flat parameters.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// Values per input row.
    pub fn input_dim(&self) -> usize {
        self.sizes.first().map_or(0, |&s| s as usize)
    }

    /// Values per output row.
    pub fn output_dim(&self) -> usize {
        self.sizes.last().map_or(0, |&s| s as usize)
    }

    /// Multiply-adds per input row (the cost model for batching decisions).
    pub fn flops_per_row(&self) -> usize {
        self.sizes
            .windows(2)
            .map(|w| w[0] as usize * w[1] as usize)
            .sum()
    }

    /// Outputs for one input row.
    ///
    /// # Errors
    /// [`ServingError::InputLength`].
    pub fn forward(&self, x: &[f32]) -> Result<Vec<f32>, ServingError> {
        self.forward_batch(x, 1)
    }

    /// Outputs for `batch` input rows stored row-major in `xs` (`batch × input_dim`); the result
    /// is `batch × output_dim`, row-major.
    ///
    /// # Errors
    /// [`ServingError::BatchTooLarge`] or [`ServingError::InputLength`].
    pub fn forward_batch(&self, xs: &[f32], batch: usize) -> Result<Vec<f32>, ServingError> {
        if batch > MAX_BATCH {
            return Err(ServingError::BatchTooLarge {
                batch,
                max: MAX_BATCH,
            });
        }
        // A model deserialized from the wire skipped `new`'s checks; re-check the shape (cheap:
        // one pass over the layer sizes) so slicing below cannot go out of bounds.
        let n = params_for(&self.sizes)?;
        if self.params.len() != n {
            return Err(ServingError::ParamsLength {
                expected: n,
                got: self.params.len(),
            });
        }
        let expected = batch * self.input_dim();
        if xs.len() != expected {
            return Err(ServingError::InputLength {
                expected,
                got: xs.len(),
            });
        }
        let mut cur = xs.to_vec();
        let mut next = Vec::new();
        let mut at = 0;
        let layers = self.sizes.len() - 1;
        for (l, w) in self.sizes.windows(2).enumerate() {
            let (fan_in, out) = (w[0] as usize, w[1] as usize);
            let weights = &self.params[at..at + fan_in * out];
            let biases = &self.params[at + fan_in * out..at + (fan_in + 1) * out];
            at += (fan_in + 1) * out;
            next.clear();
            next.resize(batch * out, 0.0);
            let relu = l + 1 < layers;
            // Weight row outside, batch rows inside: each weight row is read from memory once per
            // batch and then served from L1 for every input row.
            for (j, (row, b)) in weights.chunks_exact(fan_in).zip(biases).enumerate() {
                for (x, y) in cur.chunks_exact(fan_in).zip(next.chunks_exact_mut(out)) {
                    let v = dot(row, x) + b;
                    y[j] = if relu { v.max(0.0) } else { v };
                }
            }
            std::mem::swap(&mut cur, &mut next);
        }
        Ok(cur)
    }
}

/// Dot product with eight independent partial sums: a plain `sum()` is one serial chain of float
/// additions the compiler may not reorder, eight chains let it use SIMD lanes.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (a8, a_rest) = a.split_at(a.len() - a.len() % 8);
    let (b8, b_rest) = b.split_at(a8.len().min(b.len()));
    for (ca, cb) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for k in 0..8 {
            acc[k] += ca[k] * cb[k];
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Softmax of each row of `width` logits, in place (max-subtracted, so large logits do not
/// overflow). A trailing partial row is left as is.
pub fn softmax_rows(values: &mut [f32], width: usize) {
    if width == 0 {
        return;
    }
    for row in values.chunks_exact_mut(width) {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            sum += *v;
        }
        row.iter_mut().for_each(|v| *v /= sum);
    }
}

/// Index of the largest value of each row of `width` (the first on ties).
pub fn argmax_rows(values: &[f32], width: usize) -> Vec<u32> {
    if width == 0 {
        return Vec::new();
    }
    values
        .chunks_exact(width)
        .map(|row| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// 2 → 2 (ReLU) → 1, by hand: h = relu(W1 x + b1), y = W2 h + b2.
    #[test]
    fn forward_by_hand() {
        #[rustfmt::skip]
        let params = vec![
            1.0, -1.0,   // W1 row 0
            0.5, 2.0,    // W1 row 1
            0.0, -3.0,   // b1
            2.0, 1.0,    // W2
            0.25,        // b2
        ];
        let m = Mlp::new(&[2, 2, 1], params).unwrap();
        // x = (3, 1): pre = (2, 1.5 + 2 − 3) = (2, 0.5); h = (2, 0.5); y = 4 + 0.5 + 0.25.
        assert_eq!(m.forward(&[3.0, 1.0]).unwrap(), vec![4.75]);
        // x = (−1, 1): pre = (−2, −0.5 + 2 − 3) = (−2, −1.5); ReLU zeroes both; y = b2.
        assert_eq!(m.forward(&[-1.0, 1.0]).unwrap(), vec![0.25]);
        assert_eq!(
            m.forward_batch(&[3.0, 1.0, -1.0, 1.0], 2).unwrap(),
            vec![4.75, 0.25]
        );
        assert_eq!(m.flops_per_row(), 6);
    }

    #[test]
    fn shapes_are_checked() {
        assert!(matches!(
            Mlp::new(&[3], vec![]),
            Err(ServingError::InvalidShape(_))
        ));
        assert!(matches!(
            Mlp::new(&[3, 0], vec![]),
            Err(ServingError::InvalidShape(_))
        ));
        assert!(matches!(
            Mlp::random(&[MAX_WIDTH + 1, 2], 0),
            Err(ServingError::InvalidShape(_))
        ));
        assert!(matches!(
            Mlp::random(&[16_384, 16_384, 16_384], 0),
            Err(ServingError::InvalidShape(_))
        ));
        assert_eq!(
            Mlp::new(&[2, 1], vec![0.0; 2]),
            Err(ServingError::ParamsLength {
                expected: 3,
                got: 2
            })
        );
        assert_eq!(
            Mlp::new(&[2, 1], vec![0.0, f32::NAN, 0.0]),
            Err(ServingError::NonFiniteParams)
        );
        let m = Mlp::random(&[4, 8, 3], 1).unwrap();
        assert_eq!(
            m.forward_batch(&[0.0; 7], 2),
            Err(ServingError::InputLength {
                expected: 8,
                got: 7
            })
        );
        assert!(matches!(
            m.forward_batch(&[], MAX_BATCH + 1),
            Err(ServingError::BatchTooLarge { .. })
        ));
        assert_eq!(m.forward_batch(&[], 0).unwrap(), Vec::<f32>::new());
    }

    #[test]
    fn blocked_dot_matches_a_plain_sum() {
        for n in [0usize, 1, 7, 8, 9, 16, 31, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.7).cos()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 1.3).sin()).collect();
            let want: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            assert!((f64::from(dot(&a, &b)) - want).abs() < 1e-4, "n = {n}");
        }
    }

    #[test]
    fn softmax_and_argmax() {
        let mut v = vec![1.0, 2.0, 3.0, 1000.0, 0.0, 1000.0];
        softmax_rows(&mut v, 3);
        let e = [1.0f32.exp(), 2.0f32.exp(), 3.0f32.exp()];
        let s: f32 = e.iter().sum();
        for i in 0..3 {
            assert!((v[i] - e[i] / s).abs() < 1e-6);
        }
        assert!((v[3] - 0.5).abs() < 1e-6 && v[4] == 0.0 && (v[5] - 0.5).abs() < 1e-6);
        assert_eq!(argmax_rows(&[0.1, 0.7, 0.2, 5.0, 5.0, 1.0], 3), vec![1, 0]);
        assert!(argmax_rows(&[1.0], 0).is_empty());
    }

    #[test]
    fn model_round_trips_through_rkyv() {
        let m = Mlp::random(&[5, 7, 2], 3).unwrap();
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&m).unwrap();
        let a = rkyv::access::<ArchivedMlp, rkyv::rancor::Error>(&bytes).unwrap();
        assert_eq!(a.params.len(), m.params().len());
        let back: Mlp = rkyv::deserialize::<Mlp, rkyv::rancor::Error>(a).unwrap();
        assert_eq!(back, m);
        // A model whose sizes and params disagree (forged, or from another version) is refused
        // at inference time instead of panicking.
        let forged = Mlp {
            sizes: vec![5, 7, 2],
            params: vec![0.0; 10],
        };
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&forged).unwrap();
        let forged: Mlp = rkyv::from_bytes::<Mlp, rkyv::rancor::Error>(&bytes).unwrap();
        assert_eq!(
            forged.forward(&[0.0; 5]),
            Err(ServingError::ParamsLength {
                expected: 58,
                got: 10
            })
        );
        let no_layers = Mlp {
            sizes: vec![],
            params: vec![],
        };
        assert!(matches!(
            no_layers.forward(&[]),
            Err(ServingError::InvalidShape(_))
        ));
    }

    proptest! {
        /// A batch is exactly its rows run one by one: batching never changes an answer.
        #[test]
        fn batch_equals_rows(seed in any::<u64>(), rows in 0usize..9, hidden in 1u32..12) {
            let m = Mlp::random(&[3, hidden, hidden, 4], seed).unwrap();
            let xs: Vec<f32> = (0..rows * 3).map(|i| ((i as f32) * 0.37 + seed as f32 * 1e-20).sin()).collect();
            let batched = m.forward_batch(&xs, rows).unwrap();
            prop_assert_eq!(batched.len(), rows * 4);
            for r in 0..rows {
                let one = m.forward(&xs[r * 3..(r + 1) * 3]).unwrap();
                prop_assert_eq!(&batched[r * 4..(r + 1) * 4], &one[..]);
            }
        }
    }
}

//! Resource quantities, resource sets and node labels.
//!
//! This module is plain arithmetic: fixed-point amounts ([`Quantity`]), bundles of named amounts
//! ([`ResourceSet`]) and key/value node labels with selectors ([`Labels`], [`LabelSelector`]).
//! It knows nothing about nodes, tasks or time.
//!
//! Amounts are fixed point (1/10,000 of a unit) rather than `f64` so that acquiring and releasing
//! `0.1` CPU a million times lands exactly back where it started: float drift in an accounting
//! loop would eventually make a free node look busy, or a busy one free.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// Fixed-point resolution: how many raw units make one whole resource unit.
pub const UNITS_PER_WHOLE: u64 = 10_000;

/// The largest whole amount a [`Quantity`] can hold (about 1.8e15), e.g. 1.8 PB of memory in bytes.
pub const MAX_WHOLE: u64 = u64::MAX / UNITS_PER_WHOLE;

/// Most custom resource kinds one [`ResourceSet`] may name.
///
/// Bounds the per-check cost and the size of a set received from a peer.
pub const MAX_CUSTOM_RESOURCES: usize = 64;

/// Longest custom resource name, in bytes.
pub const MAX_RESOURCE_NAME_LEN: usize = 128;

/// Errors of resource arithmetic and construction.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ResourceError {
    /// Subtracting more than is there. The set is left unchanged; the caller should wait or pick
    /// another node.
    #[error("insufficient {resource}: need {needed}, have {available}")]
    Insufficient {
        /// Name of the first resource found short.
        resource: String,
        /// The amount asked for.
        needed: Quantity,
        /// The amount there was.
        available: Quantity,
    },
    /// A sum exceeded [`Quantity::MAX`]. The set is left unchanged; this means bad input
    /// (a node advertising absurd totals), not a transient condition.
    #[error("resource amount overflow on {resource}")]
    Overflow {
        /// Name of the resource that overflowed.
        resource: String,
    },
    /// An amount given as a float was negative, not finite, or above [`MAX_WHOLE`].
    #[error("invalid resource amount {0}")]
    InvalidAmount(f64),
    /// A custom resource name was empty, too long, or shadowed a built-in name.
    #[error("invalid resource name {0:?}")]
    InvalidName(String),
    /// A set would name more than [`MAX_CUSTOM_RESOURCES`] custom kinds.
    #[error("too many custom resources (limit {MAX_CUSTOM_RESOURCES})")]
    TooManyCustom,
}

/// A non-negative resource amount in units of 1/[`UNITS_PER_WHOLE`].
#[derive(Copy, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Quantity(u64);

impl Quantity {
    /// Nothing.
    pub const ZERO: Quantity = Quantity(0);
    /// The largest representable amount.
    pub const MAX: Quantity = Quantity(u64::MAX);

    /// An amount from raw fixed-point units (1/10,000 of a whole).
    pub const fn from_raw(raw: u64) -> Self {
        Quantity(raw)
    }

    /// A whole amount, saturating at [`Quantity::MAX`] (only reachable above [`MAX_WHOLE`]).
    pub const fn whole(n: u64) -> Self {
        Quantity(n.saturating_mul(UNITS_PER_WHOLE))
    }

    /// An amount from a float, rounded to the nearest 1/10,000.
    pub fn from_f64(x: f64) -> Result<Self, ResourceError> {
        if !x.is_finite() || x < 0.0 || x > MAX_WHOLE as f64 {
            return Err(ResourceError::InvalidAmount(x));
        }
        Ok(Quantity((x * UNITS_PER_WHOLE as f64).round() as u64))
    }

    /// The raw fixed-point value.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The amount as a float (for display and scoring only; never for accounting).
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / UNITS_PER_WHOLE as f64
    }

    /// `true` when the amount is zero.
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Checked addition.
    pub const fn checked_add(self, o: Quantity) -> Option<Quantity> {
        match self.0.checked_add(o.0) {
            Some(v) => Some(Quantity(v)),
            None => None,
        }
    }

    /// Checked subtraction (`None` if it would go negative).
    pub const fn checked_sub(self, o: Quantity) -> Option<Quantity> {
        match self.0.checked_sub(o.0) {
            Some(v) => Some(Quantity(v)),
            None => None,
        }
    }

    /// Subtraction clamped at zero.
    pub const fn saturating_sub(self, o: Quantity) -> Quantity {
        Quantity(self.0.saturating_sub(o.0))
    }
}

impl fmt::Debug for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / UNITS_PER_WHOLE;
        let frac = self.0 % UNITS_PER_WHOLE;
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let s = format!("{frac:04}");
            write!(f, "{whole}.{}", s.trim_end_matches('0'))
        }
    }
}

/// The name of a resource kind: one of the built-ins or a custom name.
///
/// Custom names are reference counted so that copying a set is cheap and never reallocates names.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    /// Logical CPUs.
    Cpu,
    /// GPUs (fractional amounts share a device).
    Gpu,
    /// Memory in bytes.
    Memory,
    /// A user-defined resource, e.g. `"accelerator_type:A100"` or `"license"`.
    Custom(Arc<str>),
}

impl ResourceKind {
    /// A custom kind, validated: non-empty, at most [`MAX_RESOURCE_NAME_LEN`] bytes, and not a
    /// built-in name (so `"CPU"` cannot be smuggled in as a custom resource).
    pub fn custom(name: &str) -> Result<Self, ResourceError> {
        if name.is_empty()
            || name.len() > MAX_RESOURCE_NAME_LEN
            || matches!(name, "CPU" | "GPU" | "memory")
        {
            return Err(ResourceError::InvalidName(name.to_owned()));
        }
        Ok(ResourceKind::Custom(Arc::from(name)))
    }

    /// A kind from its Ray-style name: `"CPU"`, `"GPU"`, `"memory"` or a custom name.
    pub fn parse(name: &str) -> Result<Self, ResourceError> {
        match name {
            "CPU" => Ok(ResourceKind::Cpu),
            "GPU" => Ok(ResourceKind::Gpu),
            "memory" => Ok(ResourceKind::Memory),
            other => ResourceKind::custom(other),
        }
    }

    /// The Ray-style name.
    pub fn name(&self) -> &str {
        match self {
            ResourceKind::Cpu => "CPU",
            ResourceKind::Gpu => "GPU",
            ResourceKind::Memory => "memory",
            ResourceKind::Custom(n) => n,
        }
    }
}

impl fmt::Debug for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A bundle of resource amounts: CPU, GPU, memory and custom kinds.
///
/// A kind that is absent is zero. The built-ins are plain fields so that the common check
/// (`fits`) touches no heap memory; custom kinds are a short vector sorted by name, merged in
/// one pass. Entries that drop to zero stay in place so that a release right after an acquire
/// does not reallocate; equality ignores them.
#[derive(Clone, Default)]
pub struct ResourceSet {
    cpu: Quantity,
    gpu: Quantity,
    memory: Quantity,
    /// Sorted by name, unique names; may hold zero amounts.
    custom: Vec<(Arc<str>, Quantity)>,
}

impl ResourceSet {
    /// The empty set (needs nothing / offers nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// A set with `cpus` whole CPUs.
    pub fn cpus(cpus: u64) -> Self {
        Self::new().with(ResourceKind::Cpu, Quantity::whole(cpus))
    }

    /// Builder: sets `kind` to `amount` (replacing any previous amount).
    ///
    /// A custom kind beyond [`MAX_CUSTOM_RESOURCES`] is ignored; use [`ResourceSet::set`] where
    /// input is untrusted and the error matters.
    pub fn with(mut self, kind: ResourceKind, amount: Quantity) -> Self {
        let _ = self.set(kind, amount);
        self
    }

    /// Sets `kind` to `amount`.
    pub fn set(&mut self, kind: ResourceKind, amount: Quantity) -> Result<(), ResourceError> {
        match kind {
            ResourceKind::Cpu => self.cpu = amount,
            ResourceKind::Gpu => self.gpu = amount,
            ResourceKind::Memory => self.memory = amount,
            ResourceKind::Custom(name) => {
                match self.custom.binary_search_by(|(n, _)| (**n).cmp(&*name)) {
                    Ok(i) => self.custom[i].1 = amount,
                    Err(i) => {
                        if self.custom.len() >= MAX_CUSTOM_RESOURCES {
                            return Err(ResourceError::TooManyCustom);
                        }
                        self.custom.insert(i, (name, amount));
                    }
                }
            }
        }
        Ok(())
    }

    /// Builds a set from Ray-style `(name, amount)` pairs, e.g. `[("CPU", 0.5), ("GPU", 1.0)]`.
    ///
    /// Validates every name and amount; repeated names are summed. Suitable for untrusted input.
    pub fn try_from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, f64)>,
    ) -> Result<Self, ResourceError> {
        let mut out = ResourceSet::new();
        for (name, amount) in pairs {
            let kind = ResourceKind::parse(name)?;
            let q = Quantity::from_f64(amount)?;
            let sum = out
                .get(&kind)
                .checked_add(q)
                .ok_or_else(|| ResourceError::Overflow {
                    resource: name.to_owned(),
                })?;
            out.set(kind, sum)?;
        }
        Ok(out)
    }

    /// Builds a set from exact `(name, raw fixed-point units)` pairs, the lossless wire form
    /// produced by [`ResourceSet::to_raw_pairs`]. Validates names; repeated names are summed.
    pub fn try_from_raw_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, u64)>,
    ) -> Result<Self, ResourceError> {
        let mut out = ResourceSet::new();
        for (name, raw) in pairs {
            let kind = ResourceKind::parse(name)?;
            let sum = out
                .get(&kind)
                .checked_add(Quantity::from_raw(raw))
                .ok_or_else(|| ResourceError::Overflow {
                    resource: name.to_owned(),
                })?;
            out.set(kind, sum)?;
        }
        Ok(out)
    }

    /// Every non-zero amount as `(Ray-style name, raw units)`: a lossless form for the wire.
    pub fn to_raw_pairs(&self) -> Vec<(String, u64)> {
        self.iter()
            .map(|(k, q)| (k.name().to_owned(), q.raw()))
            .collect()
    }

    /// The amount of `kind` (zero if absent).
    pub fn get(&self, kind: &ResourceKind) -> Quantity {
        match kind {
            ResourceKind::Cpu => self.cpu,
            ResourceKind::Gpu => self.gpu,
            ResourceKind::Memory => self.memory,
            ResourceKind::Custom(name) => self.custom_amount(name),
        }
    }

    /// CPU amount.
    pub fn cpu(&self) -> Quantity {
        self.cpu
    }

    /// GPU amount.
    pub fn gpu(&self) -> Quantity {
        self.gpu
    }

    /// Memory amount (bytes).
    pub fn memory(&self) -> Quantity {
        self.memory
    }

    fn custom_amount(&self, name: &str) -> Quantity {
        match self.custom.binary_search_by(|(n, _)| (**n).cmp(name)) {
            Ok(i) => self.custom[i].1,
            Err(_) => Quantity::ZERO,
        }
    }

    /// Every non-zero `(kind, amount)`, built-ins first.
    pub fn iter(&self) -> impl Iterator<Item = (ResourceKind, Quantity)> + '_ {
        [
            (ResourceKind::Cpu, self.cpu),
            (ResourceKind::Gpu, self.gpu),
            (ResourceKind::Memory, self.memory),
        ]
        .into_iter()
        .chain(
            self.custom
                .iter()
                .map(|(n, q)| (ResourceKind::Custom(n.clone()), *q)),
        )
        .filter(|(_, q)| !q.is_zero())
    }

    /// `true` when every amount is zero.
    pub fn is_empty(&self) -> bool {
        self.cpu.is_zero()
            && self.gpu.is_zero()
            && self.memory.is_zero()
            && self.custom.iter().all(|(_, q)| q.is_zero())
    }

    /// `true` when `self` holds at least `need` of every kind. Never allocates.
    #[inline]
    pub fn fits(&self, need: &ResourceSet) -> bool {
        if need.cpu > self.cpu || need.gpu > self.gpu || need.memory > self.memory {
            return false;
        }
        if need.custom.is_empty() {
            return true;
        }
        self.custom_fits(need)
    }

    /// Merge walk over both sorted custom vectors.
    fn custom_fits(&self, need: &ResourceSet) -> bool {
        let mut mine = self.custom.iter().peekable();
        for (name, q) in &need.custom {
            if q.is_zero() {
                continue;
            }
            loop {
                match mine.peek() {
                    None => return false,
                    Some((n, have)) => match (**n).cmp(&**name) {
                        Ordering::Less => {
                            mine.next();
                        }
                        Ordering::Equal => {
                            if have < q {
                                return false;
                            }
                            mine.next();
                            break;
                        }
                        Ordering::Greater => return false,
                    },
                }
            }
        }
        true
    }

    /// Adds `other` into `self`. Atomic: on error `self` is unchanged.
    pub fn add(&mut self, other: &ResourceSet) -> Result<(), ResourceError> {
        let overflow = |k: &str| ResourceError::Overflow {
            resource: k.to_owned(),
        };
        let cpu = self
            .cpu
            .checked_add(other.cpu)
            .ok_or_else(|| overflow("CPU"))?;
        let gpu = self
            .gpu
            .checked_add(other.gpu)
            .ok_or_else(|| overflow("GPU"))?;
        let memory = self
            .memory
            .checked_add(other.memory)
            .ok_or_else(|| overflow("memory"))?;
        // Check custom sums and the name budget first so a failure leaves `self` untouched.
        let mut new_names = 0usize;
        for (name, q) in &other.custom {
            let have = self.custom_amount(name);
            if have.checked_add(*q).is_none() {
                return Err(overflow(name));
            }
            if self
                .custom
                .binary_search_by(|(n, _)| (**n).cmp(&**name))
                .is_err()
                && !q.is_zero()
            {
                new_names += 1;
            }
        }
        if self.custom.len() + new_names > MAX_CUSTOM_RESOURCES {
            return Err(ResourceError::TooManyCustom);
        }
        self.cpu = cpu;
        self.gpu = gpu;
        self.memory = memory;
        for (name, q) in &other.custom {
            if q.is_zero() {
                continue;
            }
            match self.custom.binary_search_by(|(n, _)| (**n).cmp(&**name)) {
                // Checked above.
                Ok(i) => self.custom[i].1 = Quantity(self.custom[i].1.0 + q.0),
                Err(i) => self.custom.insert(i, (name.clone(), *q)),
            }
        }
        Ok(())
    }

    /// Subtracts `other` from `self`. Atomic: on error `self` is unchanged.
    pub fn sub(&mut self, other: &ResourceSet) -> Result<(), ResourceError> {
        if !self.fits(other) {
            return Err(self.shortfall(other));
        }
        self.cpu = Quantity(self.cpu.0 - other.cpu.0);
        self.gpu = Quantity(self.gpu.0 - other.gpu.0);
        self.memory = Quantity(self.memory.0 - other.memory.0);
        for (name, q) in &other.custom {
            if q.is_zero() {
                continue;
            }
            if let Ok(i) = self.custom.binary_search_by(|(n, _)| (**n).cmp(&**name)) {
                self.custom[i].1 = Quantity(self.custom[i].1.0 - q.0);
            }
        }
        Ok(())
    }

    /// Subtracts as much of `other` as is there, clamping each kind at zero.
    pub fn saturating_sub(&mut self, other: &ResourceSet) {
        self.cpu = self.cpu.saturating_sub(other.cpu);
        self.gpu = self.gpu.saturating_sub(other.gpu);
        self.memory = self.memory.saturating_sub(other.memory);
        for (name, q) in &other.custom {
            if let Ok(i) = self.custom.binary_search_by(|(n, _)| (**n).cmp(&**name)) {
                self.custom[i].1 = self.custom[i].1.saturating_sub(*q);
            }
        }
    }

    /// The first kind in `need` that `self` lacks, as an error.
    fn shortfall(&self, need: &ResourceSet) -> ResourceError {
        for (kind, q) in need.iter() {
            let have = self.get(&kind);
            if have < q {
                return ResourceError::Insufficient {
                    resource: kind.name().to_owned(),
                    needed: q,
                    available: have,
                };
            }
        }
        // Unreachable when called after a failed `fits`; report something sane anyway.
        ResourceError::Insufficient {
            resource: String::new(),
            needed: Quantity::ZERO,
            available: Quantity::ZERO,
        }
    }

    /// Utilisation-style load in `[0, 1]` of `available` against `total` over CPU, GPU and memory:
    /// the largest used fraction among the kinds `total` offers. Used for scoring only.
    pub fn load(total: &ResourceSet, available: &ResourceSet) -> f64 {
        let frac = |t: Quantity, a: Quantity| {
            if t.is_zero() {
                0.0
            } else {
                1.0 - (a.0.min(t.0) as f64 / t.0 as f64)
            }
        };
        frac(total.cpu, available.cpu)
            .max(frac(total.gpu, available.gpu))
            .max(frac(total.memory, available.memory))
    }
}

impl PartialEq for ResourceSet {
    /// Two sets are equal when every kind has the same amount (absent = zero).
    fn eq(&self, other: &Self) -> bool {
        self.cpu == other.cpu
            && self.gpu == other.gpu
            && self.memory == other.memory
            && self.fits_custom_exactly(other)
            && other.fits_custom_exactly(self)
    }
}

impl Eq for ResourceSet {}

impl ResourceSet {
    fn fits_custom_exactly(&self, other: &Self) -> bool {
        self.custom
            .iter()
            .all(|(n, q)| other.custom_amount(n) == *q)
    }
}

impl fmt::Debug for ResourceSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (k, q) in self.iter() {
            m.entry(&k, &q);
        }
        m.finish()
    }
}

/// Key/value labels a node advertises, e.g. `zone=eu-west-1a`, `gpu=a100`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    /// No labels.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builder: adds one label.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.0.insert(key.into(), value.into());
        self
    }

    /// Sets one label.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.insert(key.into(), value.into());
    }

    /// The value of `key`, if set.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Every label, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// How a [`LabelSelector`] tests one label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelOp {
    /// The label is set to one of these values.
    In(Vec<String>),
    /// The label is unset or set to none of these values.
    NotIn(Vec<String>),
    /// The label is set (any value).
    Exists,
    /// The label is unset.
    DoesNotExist,
}

/// A hard requirement on one node label, in the style of Kubernetes node selectors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelSelector {
    /// Label key.
    pub key: String,
    /// The test applied to the label's value.
    pub op: LabelOp,
}

impl LabelSelector {
    /// Selector `key in [value]`.
    pub fn equals(key: impl Into<String>, value: impl Into<String>) -> Self {
        LabelSelector {
            key: key.into(),
            op: LabelOp::In(vec![value.into()]),
        }
    }

    /// `true` when `labels` satisfy this selector.
    pub fn matches(&self, labels: &Labels) -> bool {
        let v = labels.value(&self.key);
        match &self.op {
            LabelOp::In(vals) => v.is_some_and(|v| vals.iter().any(|x| x == v)),
            LabelOp::NotIn(vals) => v.is_none_or(|v| vals.iter().all(|x| x != v)),
            LabelOp::Exists => v.is_some(),
            LabelOp::DoesNotExist => v.is_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(n: f64) -> ResourceSet {
        ResourceSet::try_from_pairs([("GPU", n)]).unwrap()
    }

    #[test]
    fn tenth_of_a_cpu_a_million_times_has_no_drift() {
        let total = ResourceSet::try_from_pairs([("CPU", 4.0)]).unwrap();
        let tenth = ResourceSet::try_from_pairs([("CPU", 0.1)]).unwrap();
        let mut avail = total.clone();
        for _ in 0..1_000_000 {
            avail.sub(&tenth).unwrap();
            avail.add(&tenth).unwrap();
        }
        assert_eq!(avail, total);
        for _ in 0..40 {
            avail.sub(&tenth).unwrap();
        }
        assert!(avail.is_empty());
        assert!(avail.sub(&tenth).is_err());
    }

    #[test]
    fn custom_resources_fit_and_compare() {
        let node =
            ResourceSet::try_from_pairs([("CPU", 8.0), ("license", 2.0), ("zeta", 1.0)]).unwrap();
        let need = ResourceSet::try_from_pairs([("license", 1.5)]).unwrap();
        assert!(node.fits(&need));
        let need2 = ResourceSet::try_from_pairs([("alpha", 1.0)]).unwrap();
        assert!(!node.fits(&need2));
        let mut a = node.clone();
        a.sub(&need).unwrap();
        assert_eq!(
            a.get(&ResourceKind::custom("license").unwrap()),
            Quantity::from_raw(5_000)
        );
        a.sub(&ResourceSet::try_from_pairs([("license", 0.5)]).unwrap())
            .unwrap();
        // A zero entry equals an absent one.
        assert_eq!(
            a,
            ResourceSet::try_from_pairs([("CPU", 8.0), ("zeta", 1.0)]).unwrap()
        );
    }

    #[test]
    fn sub_failure_is_atomic_and_names_the_resource() {
        let mut a = ResourceSet::try_from_pairs([("CPU", 2.0), ("GPU", 0.5)]).unwrap();
        let before = a.clone();
        let err = a.sub(&ResourceSet::try_from_pairs([("CPU", 1.0), ("GPU", 1.0)]).unwrap());
        assert!(
            matches!(err, Err(ResourceError::Insufficient { ref resource, .. }) if resource == "GPU")
        );
        assert_eq!(a, before);
        assert!(gpu(0.5).fits(&gpu(0.5)));
    }

    #[test]
    fn invalid_input_is_an_error() {
        assert!(ResourceSet::try_from_pairs([("CPU", -1.0)]).is_err());
        assert!(ResourceSet::try_from_pairs([("CPU", f64::NAN)]).is_err());
        assert!(ResourceSet::try_from_pairs([("", 1.0)]).is_err());
        assert!(ResourceKind::custom("CPU").is_err());
        let mut big = ResourceSet::new().with(ResourceKind::Cpu, Quantity::MAX);
        assert!(matches!(
            big.add(&ResourceSet::cpus(1)),
            Err(ResourceError::Overflow { .. })
        ));
        let mut many = ResourceSet::new();
        for i in 0..MAX_CUSTOM_RESOURCES {
            many.set(
                ResourceKind::custom(&format!("r{i}")).unwrap(),
                Quantity::whole(1),
            )
            .unwrap();
        }
        assert_eq!(
            many.set(
                ResourceKind::custom("one_more").unwrap(),
                Quantity::whole(1)
            ),
            Err(ResourceError::TooManyCustom)
        );
    }

    #[test]
    fn quantity_display() {
        assert_eq!(Quantity::from_f64(0.25).unwrap().to_string(), "0.25");
        assert_eq!(Quantity::whole(3).to_string(), "3");
    }

    #[test]
    fn label_selectors() {
        let l = Labels::new().with("zone", "a").with("gpu", "a100");
        assert!(LabelSelector::equals("zone", "a").matches(&l));
        assert!(!LabelSelector::equals("zone", "b").matches(&l));
        let not_in = LabelSelector {
            key: "zone".into(),
            op: LabelOp::NotIn(vec!["b".into()]),
        };
        assert!(not_in.matches(&l));
        assert!(
            LabelSelector {
                key: "x".into(),
                op: LabelOp::DoesNotExist
            }
            .matches(&l)
        );
        assert!(
            !LabelSelector {
                key: "x".into(),
                op: LabelOp::Exists
            }
            .matches(&l)
        );
    }

    #[test]
    fn raw_pairs_round_trip() {
        let a = ResourceSet::try_from_pairs([("CPU", 1.5), ("memory", 1e9), ("x", 0.25)]).unwrap();
        let pairs = a.to_raw_pairs();
        let b =
            ResourceSet::try_from_raw_pairs(pairs.iter().map(|(n, q)| (n.as_str(), *q))).unwrap();
        assert_eq!(a, b);
        assert!(ResourceSet::try_from_raw_pairs([("CPU", u64::MAX), ("CPU", 1)]).is_err());
    }
}

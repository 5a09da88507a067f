//! Property tests of `ResourceSet` arithmetic: add/sub are inverse, `fits` agrees with `sub`,
//! and failed operations leave the set unchanged. Not a test of scheduling behaviour.

use oxray_scheduler::{Quantity, ResourceKind, ResourceSet};
use proptest::prelude::*;

const NAMES: [&str; 6] = ["CPU", "GPU", "memory", "alpha", "license", "zeta"];

fn set() -> impl Strategy<Value = ResourceSet> {
    prop::collection::vec((0usize..NAMES.len(), 0u64..5_000_000), 0..8).prop_map(|pairs| {
        let mut s = ResourceSet::new();
        for (i, raw) in pairs {
            let kind = ResourceKind::parse(NAMES[i]).unwrap();
            s.set(kind, Quantity::from_raw(raw)).unwrap();
        }
        s
    })
}

proptest! {
    #[test]
    fn add_then_sub_is_identity(a in set(), b in set()) {
        let mut s = a.clone();
        s.add(&b).unwrap();
        prop_assert!(s.fits(&b));
        prop_assert!(s.fits(&a));
        s.sub(&b).unwrap();
        prop_assert_eq!(s, a);
    }

    #[test]
    fn sub_succeeds_exactly_when_fits(a in set(), b in set()) {
        let mut s = a.clone();
        let fits = a.fits(&b);
        let r = s.sub(&b);
        prop_assert_eq!(fits, r.is_ok());
        if r.is_err() {
            prop_assert_eq!(&s, &a);
        } else {
            // What is left plus what was taken is what there was.
            s.add(&b).unwrap();
            prop_assert_eq!(&s, &a);
        }
    }

    #[test]
    fn fits_is_per_kind_comparison(a in set(), b in set()) {
        let expect = NAMES.iter().all(|n| {
            let k = ResourceKind::parse(n).unwrap();
            a.get(&k) >= b.get(&k)
        });
        prop_assert_eq!(a.fits(&b), expect);
    }

    #[test]
    fn add_is_commutative(a in set(), b in set()) {
        let mut x = a.clone();
        x.add(&b).unwrap();
        let mut y = b.clone();
        y.add(&a).unwrap();
        prop_assert_eq!(x, y);
    }

    #[test]
    fn saturating_sub_never_underflows(a in set(), b in set()) {
        let mut s = a.clone();
        s.saturating_sub(&b);
        prop_assert!(a.fits(&s));
        for n in NAMES {
            let k = ResourceKind::parse(n).unwrap();
            prop_assert_eq!(s.get(&k), a.get(&k).saturating_sub(b.get(&k)));
        }
    }
}

//! Compile-time and round-trip checks that every type meant to cross a task or actor boundary meets
//! the bounds oxray's SDK puts on values (rkyv archive with checked access, high-level serializer,
//! `Send + 'static`), and that the worker state can live inside an actor. Not a test of the SDK.

use oxray_apps::env::EnvKind;
use oxray_apps::es::{
    Curve, EsCheckpoint, EsConfig, EsState, StepStats, Task, Worker, WorkerResult,
};
use oxray_apps::ps::{DataSpec, Gradient, ModelKind};
use oxray_apps::serving::Mlp;
use rkyv::api::high::{HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::de::Pool;
use rkyv::rancor::{Error, Strategy};
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

/// The same bounds as `oxray::Value`, restated so this crate need not depend on the SDK.
fn round_trip<T>(value: &T) -> T
where
    T: Archive<
            Archived: for<'a> CheckBytes<HighValidator<'a, Error>>
                          + Deserialize<T, Strategy<Pool, Error>>,
        > + for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, Error>>
        + Send
        + 'static,
{
    let bytes = rkyv::to_bytes::<Error>(value).unwrap();
    rkyv::from_bytes::<T, Error>(&bytes).unwrap()
}

fn actor_state<T: Send + 'static>() {}

#[test]
fn wire_types_meet_the_sdk_value_bounds() {
    let config = EsConfig::new(EnvKind::CartPole);
    assert_eq!(round_trip(&config), config);
    let task = Task {
        noise_seed: 1,
        episode_seed: 2,
    };
    assert_eq!(round_trip(&task), task);
    let result = WorkerResult {
        noise_seed: 1,
        episode_seed: 2,
        reward_pos: 3.0,
        reward_neg: 4.0,
        env_steps: 7,
    };
    assert_eq!(round_trip(&result), result);
    let params: Vec<f32> = vec![0.5; 10];
    assert_eq!(round_trip(&params), params);

    let mut state = EsState::new(config.clone()).unwrap();
    let mut worker = Worker::from_config(&config).unwrap();
    let results: Vec<WorkerResult> = state
        .next_tasks()
        .into_iter()
        .map(|t| worker.evaluate(state.params(), t).unwrap())
        .collect();
    let stats: StepStats = state.update(&results).unwrap();
    assert_eq!(round_trip(&stats), stats);
    let cp: EsCheckpoint = state.checkpoint();
    assert_eq!(round_trip(&cp), cp);
    let mut curve = Curve::new(EnvKind::CartPole);
    curve.push(&stats, 0.5);
    assert_eq!(round_trip(&curve), curve);

    let spec = DataSpec {
        kind: ModelKind::Logistic,
        dim: 4,
        shards: 2,
        rows_per_shard: 10,
        noise: 0.0,
        seed: 3,
    };
    assert_eq!(round_trip(&spec), spec);
    let g = spec.shard(1).unwrap().gradient(&[0.0; 4], 0, None).unwrap();
    assert_eq!(round_trip::<Gradient>(&g), g);
    let mlp = Mlp::random(&[3, 4, 2], 1).unwrap();
    assert_eq!(round_trip(&mlp), mlp);

    actor_state::<Worker>();
    actor_state::<EsState>();
}

//! The benchmark harness's own setups, run briefly over real sockets so a change that breaks
//! them shows up here rather than halfway through a `cargo bench`: followers across a veth
//! link into a network namespace (root only; skipped with a message otherwise), and round
//! trips over the in-process network.
#![cfg(feature = "app")]

use raftwire::bench::AppendBench;
use raftwire::bench::AppendOptions;
use raftwire::bench::RpcBench;
use raftwire::bench::SnapshotBench;
use raftwire::bench::Subject;
use raftwire::bench::Veth;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_and_snapshots_cross_a_veth_link() {
    let link = match Veth::create() {
        Ok(link) => link,
        Err(why) => {
            eprintln!("!!! SKIPPING the veth harness test: {why}. It needs root and network namespaces.");
            return;
        }
    };
    let mut subjects = Subject::transports();
    subjects.push(Subject::RawTls);
    for subject in subjects {
        let options = AppendOptions {
            far: Some(link.far()),
            ..Default::default()
        };
        let mut append = AppendBench::start_with(subject, 16 << 10, 8, options)
            .await
            .unwrap();
        append.run(32).await.unwrap();
        append.stop().await;
        let mut snapshot = SnapshotBench::start_on(subject, 4 << 20, Some(link.far()))
            .await
            .unwrap();
        snapshot.run().await.unwrap();
        snapshot.stop().await;
    }
    // The in-process network has no link to cross: refused, not quietly run on loopback.
    let options = AppendOptions {
        far: Some(link.far()),
        ..Default::default()
    };
    assert!(
        AppendBench::start_with(Subject::InProcess, 1024, 8, options)
            .await
            .is_err()
    );
    let ns = format!("rwbench-{}", std::process::id());
    let listed = || {
        String::from_utf8(
            std::process::Command::new("ip")
                .args(["netns", "list"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap()
    };
    assert!(listed().contains(&ns));
    drop(link);
    assert!(!listed().contains(&ns), "the namespace outlived the link");
}

/// The in-process cluster whose network encodes, copies and decodes payloads replicates
/// writes like the plain one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_encoding_in_process_cluster_replicates() {
    let cluster = raftwire::bench::ClusterBench::start(Subject::InProcessEncoded)
        .await
        .unwrap();
    let run = cluster.run(200, 8, 16 << 10).await.unwrap();
    assert_eq!(run.latencies.len(), 200);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_over_the_in_process_network() {
    let mut bench = RpcBench::start(Subject::InProcess).await.unwrap();
    assert!(bench.heartbeat().await.unwrap() > std::time::Duration::ZERO);
    assert!(bench.vote().await.unwrap() > std::time::Duration::ZERO);
    bench.stop().await;
}

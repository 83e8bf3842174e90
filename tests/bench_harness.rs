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

/// Runs `ip` with `args`; true when it succeeded.
fn ip(args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// What a run killed before its cleanup leaves: a namespace and a veth pair named after a
/// process that no longer exists, the host end holding the benchmark address. Returns the
/// namespace's name, or None where it cannot be made (not root).
fn plant_stale_link() -> Option<String> {
    let mut child = std::process::Command::new("true").spawn().ok()?;
    child.wait().ok()?;
    let pid = child.id();
    let (ns, host, far) = (format!("rwbench-{pid}"), format!("rwb{pid}"), format!("rwf{pid}"));
    let made = ip(&["netns", "add", &ns])
        && ip(&[
            "link", "add", &host, "type", "veth", "peer", "name", &far, "netns", &ns,
        ])
        && ip(&["addr", "add", "198.18.0.1/30", "dev", &host])
        && ip(&["link", "set", &host, "up"]);
    if !made {
        ip(&["netns", "del", &ns]);
        return None;
    }
    Some(ns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_and_snapshots_cross_a_veth_link() {
    // Leftovers of a killed run must not stand in the way (they would capture the route).
    let stale = plant_stale_link();
    let link = match Veth::create() {
        Ok(link) => link,
        Err(why) => {
            eprintln!("!!! SKIPPING the veth harness test: {why}. It needs root and network namespaces.");
            return;
        }
    };
    if let Some(stale) = &stale {
        assert!(
            !std::path::Path::new(&format!("/var/run/netns/{stale}")).exists(),
            "the stale namespace {stale} was not removed"
        );
        let host = stale.replace("rwbench-", "rwb");
        assert!(
            !std::path::Path::new(&format!("/sys/class/net/{host}")).exists(),
            "the stale link {host} was not removed"
        );
    }
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
    let mut snapshot = SnapshotBench::start_on(Subject::RawTlsFile, 4 << 20, Some(link.far()))
        .await
        .unwrap();
    snapshot.run().await.unwrap();
    snapshot.stop().await;
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

/// The file-to-file raw TLS baseline sends whole snapshots, again and again, and measures
/// nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_to_file_baseline_sends_snapshots_only() {
    let mut snapshot = SnapshotBench::start(Subject::RawTlsFile, (3 << 20) + 5)
        .await
        .unwrap();
    for _ in 0..2 {
        assert!(snapshot.run().await.unwrap() > std::time::Duration::ZERO);
    }
    snapshot.stop().await;
    assert!(
        AppendBench::start_with(Subject::RawTlsFile, 1024, 8, AppendOptions::default())
            .await
            .is_err()
    );
    assert!(RpcBench::start(Subject::RawTlsFile).await.is_err());
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

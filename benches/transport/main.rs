//! `cargo bench`: gRPC, QUIC and TCP under pipelined replication, framed by two baselines (a
//! raw mutual-TLS TCP stream of the same bytes, and openraft over in-process channels).
//!
//! Groups: `rpc` (vote and heartbeat round trips, over each transport and the in-process
//! network; raw ping-pong), `append` (pipelined AppendEntries to one follower by entry size and
//! window), `replication` (client writes on a 3-node cluster by concurrency and entry size),
//! `snapshot` (64 MiB and 1 GiB snapshots from a file to a file, with the heap's peak growth
//! during one transfer), `veth-append` and `veth-snapshot` (the same across a veth link into a
//! network namespace; root only), `quic-tuning`, `compression` (zstd on JSON and random
//! payloads) and `metrics`. Setup happens outside the timed calls (`iter_custom`); every
//! transport gets the same window. Each timed call also counts the process's CPU time
//! (`raftwire-cpu.json`). After criterion's own reports, the comparison SVGs and
//! `summary.json` are written to `target/criterion/raftwire/` (see BENCHMARKS.md).
//!
//! `RAFTWIRE_BENCH_QUICK=1 cargo bench` runs a reduced matrix.

mod summary;

use std::alloc::GlobalAlloc;
use std::alloc::Layout;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicIsize;
use std::sync::atomic::Ordering;
use std::time::Duration;

use criterion::BenchmarkId;
use criterion::Criterion;
use criterion::SamplingMode;
use criterion::Throughput;
use raftwire::bench::AppendBench;
use raftwire::bench::ClusterBench;
use raftwire::bench::RpcBench;
use raftwire::bench::SnapshotBench;
use raftwire::bench::Subject;
use raftwire::bench::percentile;

/// mimalloc, counting live heap bytes and their peak while `TRACK` is on (for the snapshot
/// memory figures); off, it costs one relaxed load per allocation.
struct Counting;

static TRACK: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn track(delta: isize) {
    if TRACK.load(Ordering::Relaxed) {
        let now = LIVE.fetch_add(delta, Ordering::Relaxed) + delta;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to mimalloc; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { mimalloc::MiMalloc.alloc(layout) };
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) };
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) };
        track(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            track(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` with heap tracking on; returns its result and the peak growth of live heap bytes
/// (allocations made before, freed during, count as negative growth and are clamped away).
fn peak_growth<T>(f: impl FnOnce() -> T) -> (T, u64) {
    LIVE.store(0, Ordering::SeqCst);
    PEAK.store(0, Ordering::SeqCst);
    TRACK.store(true, Ordering::SeqCst);
    let out = f();
    TRACK.store(false, Ordering::SeqCst);
    (out, PEAK.load(Ordering::SeqCst).max(0) as u64)
}

/// p50/p99 of the individual operations, per benchmark id, for the summary.
type Latencies = BTreeMap<String, Vec<Duration>>;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Criterion's filter arguments (`cargo bench -- append/quic`): setups of benchmarks no filter
/// selects are skipped too, so one figure can be reproduced without running the rest.
fn filters() -> Vec<String> {
    const TAKES_VALUE: &[&str] = &[
        "--save-baseline",
        "--baseline",
        "--baseline-lenient",
        "--load-baseline",
        "--sample-size",
        "--warm-up-time",
        "--measurement-time",
        "--nresamples",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--profile-time",
        "--plotting-backend",
        "--output-format",
        "--color",
        "--format",
    ];
    let mut out = Vec::new();
    let mut skip = false;
    for arg in std::env::args().skip(1) {
        if skip {
            skip = false;
        } else if TAKES_VALUE.contains(&arg.as_str()) {
            skip = true;
        } else if !arg.starts_with('-') {
            out.push(arg);
        }
    }
    out
}

/// Whether benchmark `id` (`group/function/parameter`) is selected: criterion's filters are
/// regular expressions matched anywhere in the id.
fn wanted(id: &str) -> bool {
    let f = filters();
    f.is_empty()
        || f.iter().any(|f| match regex::Regex::new(f) {
            Ok(re) => re.is_match(id),
            Err(_) => id.contains(f.as_str()),
        })
}

fn quick() -> bool {
    std::env::var_os("RAFTWIRE_BENCH_QUICK").is_some()
}

fn rpc(c: &mut Criterion, rt: &tokio::runtime::Runtime, latencies: &mut Latencies) {
    let mut group = c.benchmark_group("rpc");
    let mut subjects = Subject::transports();
    // openraft's (and raftwire's pipeline) share of a round trip: the in-process network.
    subjects.push(Subject::InProcess);
    for subject in subjects {
        let name = subject.name();
        if !wanted(&format!("rpc/vote/{name}")) && !wanted(&format!("rpc/heartbeat/{name}")) {
            continue;
        }
        let mut bench = rt.block_on(RpcBench::start(subject)).expect("rpc setup");
        let mut votes = Vec::new();
        group.bench_function(BenchmarkId::new("vote", subject.name()), |b| {
            b.iter_custom(|iters| {
                let _cpu = CpuCount::new(format!("rpc/vote/{name}"), iters);
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let t = bench.vote().await.expect("vote");
                        votes.push(t);
                        total += t;
                    }
                    total
                })
            })
        });
        latencies.insert(format!("rpc/vote/{}", subject.name()), votes);
        let mut beats = Vec::new();
        group.bench_function(BenchmarkId::new("heartbeat", subject.name()), |b| {
            b.iter_custom(|iters| {
                let _cpu = CpuCount::new(format!("rpc/heartbeat/{name}"), iters);
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let t = bench.heartbeat().await.expect("heartbeat");
                        beats.push(t);
                        total += t;
                    }
                    total
                })
            })
        });
        latencies.insert(format!("rpc/heartbeat/{}", subject.name()), beats);
        rt.block_on(bench.stop());
    }
    if !wanted("rpc/ping-pong/raw-tls") {
        group.finish();
        return;
    }
    let mut raw = rt.block_on(RpcBench::start(Subject::RawTls)).expect("raw setup");
    let mut pings = Vec::new();
    group.bench_function(BenchmarkId::new("ping-pong", "raw-tls"), |b| {
        b.iter_custom(|iters| {
            let _cpu = CpuCount::new("rpc/ping-pong/raw-tls".into(), iters);
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = raw.vote().await.expect("ping");
                    pings.push(t);
                    total += t;
                }
                total
            })
        })
    });
    latencies.insert("rpc/ping-pong/raw-tls".into(), pings);
    group.finish();
}

fn append(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let mut group = c.benchmark_group("append");
    let sizes: &[usize] = if quick() {
        &[16 << 10]
    } else {
        &[64, 1 << 10, 16 << 10, 256 << 10]
    };
    let windows: &[usize] = if quick() { &[64] } else { &[1, 8, 64] };
    let mut subjects = Subject::transports();
    subjects.extend([Subject::RawTls, Subject::InProcess]);
    for &size in sizes {
        for &window in windows {
            for &subject in &subjects {
                if !wanted(&format!("append/{}/{size}B-w{window}", subject.name())) {
                    continue;
                }
                let bench = rt
                    .block_on(AppendBench::start(subject, size, window))
                    .expect("append setup");
                let id = ("append", subject.name().to_string(), format!("{size}B-w{window}"));
                measure_appends(&mut group, rt, bench, id);
            }
        }
    }
    group.finish();
}

/// Times `run` (one iteration each), recording the process's CPU time beside criterion's
/// wall time. `id` is (group, function, parameter).
fn measure(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    throughput: Throughput,
    (group_name, function, parameter): (&str, String, String),
    mut run: impl AsyncFnMut() -> Duration,
) {
    let key = format!("{group_name}/{function}/{parameter}");
    group.throughput(throughput);
    group.bench_function(BenchmarkId::new(function, parameter), |b| {
        b.iter_custom(|iters| {
            let _cpu = CpuCount::new(key.clone(), iters);
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += run().await;
                }
                total
            })
        })
    });
}

/// Times about 8 MiB of pipelined appends per iteration, then stops the follower. `id` is
/// (group, function, parameter).
fn measure_appends(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    mut bench: AppendBench,
    id: (&str, String, String),
) {
    let requests = ((8usize << 20) / bench.bytes_per_request() as usize).max(8);
    let bytes = Throughput::Bytes(bench.bytes_per_request() * requests as u64);
    measure(group, rt, bytes, id, async || {
        bench.run(requests).await.expect("append")
    });
    rt.block_on(bench.stop());
}

/// Times whole snapshot transfers of `size` bytes, then stops the receiver. `id` is (group,
/// function, parameter).
fn measure_snapshots(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    mut bench: SnapshotBench,
    size: u64,
    id: (&str, String, String),
) {
    measure(group, rt, Throughput::Bytes(size), id, async || {
        bench.run().await.expect("snapshot")
    });
    rt.block_on(bench.stop());
}

fn replication(c: &mut Criterion, rt: &tokio::runtime::Runtime, latencies: &mut Latencies) {
    let mut group = c.benchmark_group("replication");
    let sizes: &[usize] = if quick() { &[256] } else { &[256, 16 << 10] };
    let writers: &[usize] = if quick() { &[256] } else { &[1, 64, 256] };
    let mut subjects = Subject::transports();
    subjects.extend([Subject::InProcess, Subject::InProcessEncoded]);
    for &subject in &subjects {
        let id = |size: usize, w: usize| format!("replication/{}/{size}B-c{w}", subject.name());
        if !sizes
            .iter()
            .any(|&size| writers.iter().any(|&w| wanted(&id(size, w))))
        {
            continue;
        }
        let cluster = rt.block_on(ClusterBench::start(subject)).expect("cluster setup");
        for &size in sizes {
            for &w in writers {
                if !wanted(&id(size, w)) {
                    continue;
                }
                let writes = if w == 1 { 500 } else { 5_000 };
                rt.block_on(cluster.run(writes / 5, w, size)).expect("warm-up");
                let mut all = Vec::new();
                group.throughput(Throughput::Elements(writes as u64));
                group.bench_function(BenchmarkId::new(subject.name(), format!("{size}B-c{w}")), |b| {
                    b.iter_custom(|iters| {
                        let _cpu = CpuCount::new(id(size, w), iters);
                        rt.block_on(async {
                            let mut total = Duration::ZERO;
                            for _ in 0..iters {
                                let run = cluster.run(writes, w, size).await.expect("writes");
                                total += run.elapsed;
                                all.extend(run.latencies);
                            }
                            total
                        })
                    })
                });
                latencies.insert(format!("replication/{}/{size}B-c{w}", subject.name()), all);
            }
        }
        rt.block_on(cluster.stop());
    }
    group.finish();
}

fn snapshot(c: &mut Criterion, rt: &tokio::runtime::Runtime) -> BTreeMap<String, u64> {
    let mut memory = BTreeMap::new();
    let mut group = c.benchmark_group("snapshot");
    group.sampling_mode(SamplingMode::Flat).sample_size(10);
    let sizes: &[(u64, &str)] = if quick() {
        &[(64 << 20, "64MiB")]
    } else {
        &[(64 << 20, "64MiB"), (1 << 30, "1GiB")]
    };
    let mut subjects = Subject::transports();
    subjects.extend([Subject::RawTls, Subject::RawTlsFile]);
    for &(size, label) in sizes {
        for &subject in &subjects {
            if !wanted(&format!("snapshot/{}/{label}", subject.name())) {
                continue;
            }
            let mut bench = rt
                .block_on(SnapshotBench::start(subject, size))
                .expect("snapshot setup");
            rt.block_on(bench.run()).expect("snapshot warm-up");
            let (probe, growth) = peak_growth(|| rt.block_on(bench.run()));
            probe.expect("snapshot probe");
            memory.insert(format!("snapshot/{}/{label}", subject.name()), growth);
            let id = ("snapshot", subject.name().to_string(), label.to_string());
            measure_snapshots(&mut group, rt, bench, size, id);
        }
    }
    group.finish();
    memory
}

/// The QUIC defaults against the alternatives they were chosen over, on pipelined appends.
#[cfg(feature = "quic")]
fn quic_tuning(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    use raftwire::CongestionControl;
    use raftwire::QuicTuning;
    use raftwire::Transport;
    let mut variants: Vec<(&str, QuicTuning)> = vec![("raftwire-defaults", QuicTuning::default())];
    let mut quinn = QuicTuning::default();
    quinn.stream_receive_window = 1_250_000;
    quinn.receive_window = u64::MAX >> 2;
    quinn.send_window = 10_000_000;
    quinn.initial_mtu = 1200;
    variants.push(("quinn-defaults", quinn));
    let mut mtu = QuicTuning::default();
    mtu.initial_mtu = 1200;
    variants.push(("mtu-1200", mtu));
    let mut window = QuicTuning::default();
    window.stream_receive_window = 1_250_000;
    variants.push(("stream-window-1.25MB", window));
    let mut bbr = QuicTuning::default();
    bbr.congestion = CongestionControl::Bbr;
    variants.push(("bbr", bbr));
    let mut newreno = QuicTuning::default();
    newreno.congestion = CongestionControl::NewReno;
    variants.push(("newreno", newreno));
    // Path MTU discovery allowed past Ethernet's 1500: a jumbo-frame LAN's bound, and
    // loopback's (which carries 64 KiB datagrams).
    for (name, bound) in [("mtu-bound-8952", 8952), ("mtu-bound-65527", 65527)] {
        let mut raised = QuicTuning::default();
        raised.max_mtu = bound;
        variants.push((name, raised));
    }
    let sizes: &[usize] = if quick() {
        &[16 << 10]
    } else {
        &[16 << 10, 256 << 10]
    };
    let mut group = c.benchmark_group("quic-tuning");
    for &size in sizes {
        for (name, tuning) in &variants {
            if !wanted(&format!("quic-tuning/{name}/{size}B-w64")) {
                continue;
            }
            let subject = Subject::Transport(Transport::Quic);
            let bench = rt
                .block_on(AppendBench::start_with(
                    subject,
                    size,
                    64,
                    raftwire::bench::AppendOptions {
                        quic: tuning.clone(),
                        ..Default::default()
                    },
                ))
                .expect("quic setup");
            measure_appends(
                &mut group,
                rt,
                bench,
                ("quic-tuning", name.to_string(), format!("{size}B-w64")),
            );
        }
    }
    group.finish();
}

/// Pipelined appends and a snapshot to a follower across a veth link (MTU 1500) into a
/// network namespace, where TCP gets segmentation offload and QUIC GSO as on a LAN. Needs
/// root: skipped with a message otherwise.
fn veth(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    use raftwire::bench::AppendOptions;
    let sizes: &[usize] = if quick() {
        &[16 << 10]
    } else {
        &[16 << 10, 256 << 10]
    };
    let mut subjects = Subject::transports();
    subjects.push(Subject::RawTls);
    let snapshot_subjects: Vec<Subject> = subjects.iter().copied().chain([Subject::RawTlsFile]).collect();
    let append_id = |s: Subject, size: usize| format!("veth-append/{}/{size}B-w64", s.name());
    let snapshot_id = |s: Subject| format!("veth-snapshot/{}/64MiB", s.name());
    let ids: Vec<String> = subjects
        .iter()
        .flat_map(|&s| sizes.iter().map(move |&size| append_id(s, size)))
        .chain(snapshot_subjects.iter().map(|&s| snapshot_id(s)))
        .collect();
    if !ids.iter().any(|id| wanted(id)) {
        return;
    }
    let link = match raftwire::bench::Veth::create() {
        Ok(link) => link,
        Err(why) => {
            eprintln!("!!! SKIPPING the veth benchmarks: {why} (they need root and network namespaces)");
            return;
        }
    };
    let mut group = c.benchmark_group("veth-append");
    for &size in sizes {
        for &subject in &subjects {
            if !wanted(&append_id(subject, size)) {
                continue;
            }
            let parameter = format!("{size}B-w64");
            let options = AppendOptions {
                far: Some(link.far()),
                ..Default::default()
            };
            let bench = rt
                .block_on(AppendBench::start_with(subject, size, 64, options))
                .expect("veth append setup");
            measure_appends(
                &mut group,
                rt,
                bench,
                ("veth-append", subject.name().to_string(), parameter),
            );
        }
    }
    group.finish();
    let mut group = c.benchmark_group("veth-snapshot");
    group.sampling_mode(SamplingMode::Flat).sample_size(10);
    for &subject in &snapshot_subjects {
        if !wanted(&snapshot_id(subject)) {
            continue;
        }
        let size = 64 << 20;
        let mut bench = rt
            .block_on(SnapshotBench::start_on(subject, size, Some(link.far())))
            .expect("veth snapshot setup");
        rt.block_on(bench.run()).expect("snapshot warm-up");
        let id = ("veth-snapshot", subject.name().to_string(), "64MiB".to_string());
        measure_snapshots(&mut group, rt, bench, size, id);
    }
    group.finish();
    drop(link);
}

/// zstd compression against none, on pipelined 16 KiB appends of JSON records (compressible)
/// and of random bytes (not), per transport. Throughput counts the uncompressed payload.
#[cfg(feature = "compression")]
fn compression(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    use raftwire::Compression;
    use raftwire::bench::AppendOptions;
    use raftwire::bench::Payload;
    let size = 16 << 10;
    let mut group = c.benchmark_group("compression");
    for subject in Subject::transports() {
        for (setting, compression) in [("off", Compression::Off), ("zstd", Compression::zstd())] {
            for (payload_name, payload) in [("json", Payload::Json), ("random", Payload::Random)] {
                let function = format!("{}-{setting}", subject.name());
                let parameter = format!("{payload_name}-{size}B-w64");
                if !wanted(&format!("compression/{function}/{parameter}")) {
                    continue;
                }
                let options = AppendOptions {
                    compression,
                    payload,
                    ..Default::default()
                };
                let bench = rt
                    .block_on(AppendBench::start_with(subject, size, 64, options))
                    .expect("append setup");
                measure_appends(&mut group, rt, bench, ("compression", function, parameter));
            }
        }
    }
    group.finish();
}

/// What metrics cost: the metrics work of one append with no recorder, then (a Prometheus
/// recorder installed for the rest of the process, so this group runs last) with one, and
/// pipelined 16 KiB appends over each transport with it, to set beside `append/*/16384B-w64`
/// (measured with none).
fn metrics_cost(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let mut group = c.benchmark_group("metrics");
    let transport = Subject::transports()
        .into_iter()
        .find_map(|s| match s {
            Subject::Transport(t) => Some(t),
            _ => None,
        })
        .expect("a transport is compiled");
    group.throughput(Throughput::Elements(1));
    group.bench_function("per-append/no-recorder", |b| {
        b.iter_custom(|iters| raftwire::bench::metrics_per_append(transport, iters))
    });
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        eprintln!("metrics: a recorder is already installed; skipping the measurements with one");
        return;
    }
    group.bench_function("per-append/prometheus", |b| {
        b.iter_custom(|iters| {
            let took = raftwire::bench::metrics_per_append(transport, iters);
            // What a scrape would do, outside the timed region: drain the histograms.
            handle.run_upkeep();
            took
        })
    });
    for subject in Subject::transports() {
        let size = 16 << 10;
        if !wanted(&format!(
            "metrics/append-prometheus/{}/{size}B-w64",
            subject.name()
        )) {
            continue;
        }
        let bench = rt
            .block_on(AppendBench::start(subject, size, 64))
            .expect("append setup");
        let id = (
            "metrics",
            format!("append-prometheus/{}", subject.name()),
            format!("{size}B-w64"),
        );
        measure_appends(&mut group, rt, bench, id);
        handle.run_upkeep();
    }
    group.finish();
}

/// Process CPU time (every thread: both ends of the connection, and the Raft nodes) spent in
/// each benchmark's `iter_custom` calls, warm-up included, and the iterations they ran.
static CPU: Mutex<BTreeMap<String, (Duration, u64)>> = Mutex::new(BTreeMap::new());

/// Adds the process CPU time from its creation to its drop, and `iters` iterations, to a
/// benchmark's account in [`CPU`].
struct CpuCount {
    id: String,
    iters: u64,
    start: Duration,
}

impl CpuCount {
    fn new(id: String, iters: u64) -> Self {
        CpuCount {
            id,
            iters,
            start: raftwire::bench::cpu_time(),
        }
    }
}

impl Drop for CpuCount {
    fn drop(&mut self) {
        let spent = raftwire::bench::cpu_time().saturating_sub(self.start);
        let mut cpu = CPU.lock().unwrap_or_else(|p| p.into_inner());
        let account = cpu.entry(std::mem::take(&mut self.id)).or_default();
        account.0 += spent;
        account.1 += self.iters;
    }
}

/// `raftwire-cpu.json`: CPU seconds per iteration of every benchmark that counted its CPU.
fn write_cpu() -> std::io::Result<()> {
    let cpu = CPU.lock().unwrap_or_else(|p| p.into_inner());
    let out: serde_json::Map<String, serde_json::Value> = cpu
        .iter()
        .filter(|(_, (_, iters))| *iters > 0)
        .map(|(id, (spent, iters))| {
            let per_iter = spent.as_secs_f64() / *iters as f64;
            (id.clone(), serde_json::json!({ "cpu_s_per_iter": per_iter }))
        })
        .collect();
    merge_side("raftwire-cpu.json", out)
}

/// Writes `entries` into the side file `name` of the criterion directory, keeping the entries
/// of benchmarks this run did not measure (a filtered run updates only its own).
fn merge_side(name: &str, entries: serde_json::Map<String, serde_json::Value>) -> std::io::Result<()> {
    let dir = criterion_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    let mut all = match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        },
        Err(_) => serde_json::Map::new(),
    };
    all.extend(entries);
    std::fs::write(path, serde_json::to_vec_pretty(&all)?)
}

fn criterion_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("criterion")
}

fn write_latencies(latencies: &mut Latencies) -> std::io::Result<()> {
    let mut out = serde_json::Map::new();
    for (id, samples) in latencies.iter_mut() {
        if samples.is_empty() {
            continue;
        }
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        out.insert(
            id.clone(),
            serde_json::json!({"p50_us": us(percentile(samples, 50.0)), "p99_us": us(percentile(samples, 99.0))}),
        );
    }
    merge_side("raftwire-latency.json", out)
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(if quick() { 1 } else { 3 }))
        .configure_from_args();
    let rt = runtime();
    let mut latencies = Latencies::new();
    rpc(&mut c, &rt, &mut latencies);
    append(&mut c, &rt);
    replication(&mut c, &rt, &mut latencies);
    let memory = snapshot(&mut c, &rt);
    veth(&mut c, &rt);
    #[cfg(feature = "quic")]
    quic_tuning(&mut c, &rt);
    #[cfg(feature = "compression")]
    compression(&mut c, &rt);
    metrics_cost(&mut c, &rt);
    c.final_summary();
    let memory: serde_json::Map<String, serde_json::Value> = memory
        .into_iter()
        .map(|(id, bytes)| (id, serde_json::json!({"peak_growth_bytes": bytes})))
        .collect();
    if let Err(e) = merge_side("raftwire-memory.json", memory) {
        eprintln!("cannot write the memory side file: {e}");
    }
    if let Err(e) = write_latencies(&mut latencies) {
        eprintln!("cannot write the latency side file: {e}");
    }
    if let Err(e) = write_cpu() {
        eprintln!("cannot write the CPU side file: {e}");
    }
    let dir = criterion_dir();
    match summary::write_summary(&dir, &dir.join("raftwire")) {
        Ok(files) => {
            for f in files {
                println!("summary chart: {}", f.display());
            }
        }
        Err(e) => eprintln!("cannot write the summary charts: {e}"),
    }
}

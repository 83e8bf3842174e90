//! The `raftwire` command line: `raftwire demo` runs a whole cluster lifecycle on loopback;
//! `raftwire certs` makes and inspects the cluster CA, node and client certificates;
//! `raftwire node` runs one node of a secured cluster on durable storage and `raftwire ctl`
//! operates it.

mod certs_cmd;
// The client API of `node` and `ctl` is gRPC.
#[cfg(feature = "grpc")]
mod node_cmd;

use std::process::ExitCode;

use clap::Parser;
use clap::Subcommand;
use raftwire::Transport;
use raftwire::demo;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "raftwire",
    version,
    about = "A production network layer for openraft clusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a 3-node cluster on loopback: writes, linearizable reads, failover, snapshot catch-up.
    Demo {
        /// Transport: grpc or quic (those compiled in), or a preference list such as
        /// `quic,grpc` (every node serves all of them and prefers the first).
        #[arg(long, default_value_t = Transports(vec![Transport::default()]))]
        transport: Transports,
        /// Keys to write.
        #[arg(long, default_value_t = 10_000)]
        writes: u64,
        /// Bytes per value.
        #[arg(long, default_value_t = 64)]
        value_size: usize,
        /// Concurrent writers.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Print one JSON line instead of the narration.
        #[arg(long)]
        json: bool,
        /// Run without TLS (insecure; logged). Default: mutual TLS with a generated CA.
        #[arg(long)]
        insecure_plaintext: bool,
    },
    /// Measures the transports against raw TLS and in-process baselines (reduced matrix; the
    /// full one is `cargo bench`).
    Bench {
        /// Run the reduced matrix (under two minutes). Required: the full matrix is `cargo bench`.
        #[arg(long)]
        quick: bool,
        /// Print one JSON line instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Makes and inspects certificates for mutual TLS: a cluster CA, node and client certificates.
    Certs {
        #[command(subcommand)]
        command: certs_cmd::CertsCommand,
    },
    /// Runs one node of a secured cluster on durable storage until SIGTERM or SIGINT.
    #[cfg(feature = "grpc")]
    Node(node_cmd::NodeArgs),
    /// Operates a cluster through its nodes' client API.
    #[cfg(feature = "grpc")]
    Ctl(node_cmd::CtlArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RAFTWIRE_LOG")
                .unwrap_or_else(|_| "warn,openraft=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let command = match cli.command {
        Command::Certs { command } => return certs_cmd::run(command),
        other => other,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match command {
        Command::Certs { command } => certs_cmd::run(command),
        #[cfg(feature = "grpc")]
        Command::Node(args) => node_cmd::node(args, &runtime),
        #[cfg(feature = "grpc")]
        Command::Ctl(args) => node_cmd::ctl(args, &runtime),
        Command::Bench { quick, json } => {
            if !quick {
                eprintln!("error: only `raftwire bench --quick` runs here; the full matrix is `cargo bench`");
                return ExitCode::from(2);
            }
            bench_quick(&runtime, json)
        }
        Command::Demo {
            transport,
            writes,
            value_size,
            concurrency,
            json,
            insecure_plaintext,
        } => {
            let opts = demo::DemoOptions {
                transports: transport.0,
                writes,
                value_size,
                concurrency,
                verbose: !json,
                plaintext: insecure_plaintext,
            };
            match runtime.block_on(demo::run(opts)) {
                Ok(report) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string(&report)
                                .unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"{e}\"}}"))
                        );
                    } else {
                        println!("demo complete over {}:", report.transport);
                        println!("  security            {}", report.tls);
                        println!("  nodes               {}", report.nodes);
                        println!(
                            "  writes              {} ({:.0} writes/s)",
                            report.writes, report.writes_per_sec
                        );
                        println!("  leader changes      {}", report.leader_changes);
                        println!("  snapshot installed  {}", report.snapshot_installed);
                        println!("  elapsed             {} ms", report.elapsed_ms);
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    if json {
                        let line = serde_json::json!({"ok": false, "step": e.step, "error": e.reason});
                        println!("{line}");
                    } else {
                        eprintln!("error: {e}");
                    }
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn bench_quick(runtime: &tokio::runtime::Runtime, json: bool) -> ExitCode {
    let report = runtime.block_on(raftwire::bench::quick(|step| {
        if !json {
            eprintln!("==> measuring {step}");
        }
    }));
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            if json {
                println!("{}", serde_json::json!({"ok": false, "error": e.to_string()}));
            } else {
                eprintln!("error: {e}");
            }
            return ExitCode::FAILURE;
        }
    };
    if json {
        match serde_json::to_string(&report) {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("error: cannot encode the report: {e}");
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    }
    let mib = |b: f64| b / (1 << 20) as f64;
    println!(
        "{:<12} {:>13} {:>7} {:>9} {:>10} {:>9} {:>8} {:>10} {:>10} {:>7}",
        "subject",
        "append MiB/s",
        "vs raw",
        "cpu ms/MiB",
        "writes/s",
        "vs inproc",
        "cpu µs/w",
        "hb p50 µs",
        "hb p99 µs",
        "vs raw"
    );
    println!(
        "{:<12} {:>13.1} {:>7} {:>9.2} {:>10} {:>9} {:>8} {:>10.1} {:>10.1} {:>7}",
        "raw-tls",
        mib(report.raw_tls_bytes_per_sec),
        "1.00",
        report.raw_tls_cpu_s_per_mib * 1e3,
        "-",
        "-",
        "-",
        report.raw_tls_ping_p50_us,
        report.raw_tls_ping_p99_us,
        "1.00"
    );
    println!(
        "{:<12} {:>13.1} {:>7} {:>9} {:>10.0} {:>9} {:>8.1} {:>10.1} {:>10} {:>7}",
        "in-process",
        mib(report.in_process_bytes_per_sec),
        "-",
        "-",
        report.in_process_writes_per_sec,
        "1.00",
        report.in_process_write_cpu_us,
        report.in_process_heartbeat_p50_us,
        "-",
        "-"
    );
    for (name, t) in &report.transports {
        println!(
            "{:<12} {:>13.1} {:>7.2} {:>9.2} {:>10.0} {:>9.2} {:>8.1} {:>10.1} {:>10.1} {:>7.2}",
            name,
            mib(t.append_16k_bytes_per_sec),
            t.append_16k_vs_raw_tls,
            t.append_16k_cpu_s_per_mib * 1e3,
            t.writes_per_sec_256,
            t.writes_vs_in_process,
            t.write_cpu_us,
            t.heartbeat_p50_us,
            t.heartbeat_p99_us,
            t.heartbeat_p50_vs_raw
        );
    }
    println!(
        "append: pipelined 16 KiB entries, window 64; writes: 3 nodes, 256 writers, 256 B; hb: heartbeat round trip; cpu: user + system of the whole process (every node)"
    );
    ExitCode::SUCCESS
}

/// A `--transport` preference list: `quic,grpc`.
#[derive(Debug, Clone)]
struct Transports(Vec<Transport>);

impl std::str::FromStr for Transports {
    type Err = raftwire::ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Transport::parse_list(s).map(Transports)
    }
}

impl std::fmt::Display for Transports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|t| t.name()).collect();
        f.write_str(&names.join(","))
    }
}

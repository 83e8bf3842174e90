//! A second "host" for the benchmarks: a network namespace joined to this one by a veth pair
//! with Ethernet's MTU (1500), and a tokio runtime whose threads live in it, so a follower
//! started there is reached over the veth link (with the kernel's segmentation offloads, as on
//! a LAN) instead of loopback. Needs root and `ip`; [`Veth::create`] says why not otherwise.

use std::future::Future;
use std::net::IpAddr;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;

use super::BenchError;
use super::bench_err;

/// The link's MTU: Ethernet's.
pub const VETH_MTU: u32 = 1500;

/// The namespace, the veth pair and the runtime inside; all removed on drop.
pub struct Veth {
    runtime: Option<tokio::runtime::Runtime>,
    far: Far,
    /// Dropped after the runtime (fields drop in order).
    _made: Made,
}

/// The namespace and the pair, deleted on drop.
struct Made {
    ns: String,
    host_if: String,
}

impl Drop for Made {
    fn drop(&mut self) {
        // Deleting one end deletes the pair; deleting the namespace would too.
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// Where a benchmark's receiving end runs: a runtime inside the namespace, and the address it
/// is reached at.
#[derive(Debug, Clone)]
pub struct Far {
    handle: tokio::runtime::Handle,
    addr: IpAddr,
}

impl Far {
    /// The address the far side's listeners bind (port 0: any).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// Runs `fut` on the far side's runtime (its sockets are made in the namespace) and waits.
    pub async fn run<F>(&self, fut: F) -> Result<F::Output, BenchError>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle
            .spawn(fut)
            .await
            .map_err(|e| bench_err("veth host")(e.to_string()))
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// Removes the namespaces and links an earlier run left behind when it was killed before its
/// `Drop` ran (`rwbench-<pid>` / `rwb<pid>` of a process that no longer exists): a stale
/// link still holding 198.18.0.1/30 would route this run's traffic into nowhere. "No longer
/// exists" is judged by this PID namespace's `/proc`: containers that share a network
/// namespace but not a PID namespace must not run the veth benchmarks side by side.
fn remove_stale() {
    let dead =
        |pid: &str| pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists();
    let names = |dir: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    for ns in names("/var/run/netns") {
        if let Some(pid) = ns.strip_prefix("rwbench-")
            && dead(pid)
        {
            // Deleting the namespace deletes the far end, and with it the pair.
            let _ = ip(&["netns", "del", &ns]);
        }
    }
    for link in names("/sys/class/net") {
        if let Some(pid) = link.strip_prefix("rwb")
            && dead(pid)
        {
            let _ = ip(&["link", "del", &link]);
        }
    }
}

impl Veth {
    /// Makes the namespace (`rwbench-<pid>`), the pair (`rwb<pid>` here at 198.18.0.1/30,
    /// its peer inside at 198.18.0.2/30: the range RFC 2544 sets aside for benchmarks) and
    /// the runtime. `Err` says why not (not root, no `ip`, no namespaces); whatever was made
    /// is removed again, and so is what killed earlier runs left.
    pub fn create() -> Result<Veth, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        remove_stale();
        let pid = std::process::id();
        let ns = format!("rwbench-{pid}");
        let host_if = format!("rwb{}", pid % 10_000_000);
        let far_if = format!("rwf{}", pid % 10_000_000);
        ip(&["netns", "add", &ns])?;
        // From here on, dropping `made` removes what exists.
        let made = Made {
            ns: ns.clone(),
            host_if: host_if.clone(),
        };
        let mtu = VETH_MTU.to_string();
        ip(&[
            "link", "add", &host_if, "mtu", &mtu, "type", "veth", "peer", "name", &far_if, "mtu", &mtu,
            "netns", &ns,
        ])?;
        ip(&["addr", "add", "198.18.0.1/30", "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&["-n", &ns, "addr", "add", "198.18.0.2/30", "dev", &far_if])?;
        ip(&["-n", &ns, "link", "set", &far_if, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        let file = Arc::new(
            std::fs::File::open(format!("/var/run/netns/{ns}"))
                .map_err(|e| format!("namespace {ns}: {e}"))?,
        );
        let entered = file.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("veth-host")
            .on_thread_start(move || {
                // SAFETY: setns with an open namespace file changes only this thread's network
                // namespace.
                let rc = unsafe { libc::setns(entered.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    // Sockets made on this thread would be on the wrong side of the link.
                    eprintln!(
                        "setns {}: {}",
                        entered.as_raw_fd(),
                        std::io::Error::last_os_error()
                    );
                    std::process::abort();
                }
            })
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        drop(file);
        Ok(Veth {
            far: Far {
                handle: runtime.handle().clone(),
                addr: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)),
            },
            runtime: Some(runtime),
            _made: made,
        })
    }

    /// The far side.
    pub fn far(&self) -> Far {
        self.far.clone()
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

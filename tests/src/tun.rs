//! A point-to-point L3 link made of two TUN devices, one in each of two network namespaces,
//! whose packets the test process copies across: a link whose frames start at the IP header,
//! as on `tunl0`, WireGuard or `ip6tnl`, on a kernel without those modules.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read as _, Write as _},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use bkp_sandbox::netns::Netns;

/// How long the pump waits for a packet before it looks at the shutdown flag again.
const POLL_MS: libc::c_int = 50;
const TUN_CONTROL: &str = "/dev/net/tun";
/// Bound on a pump's life, in case its owner leaks it instead of dropping it.
const MAX_LIFE: Duration = Duration::from_secs(600);

/// Creates the TUN device `name` (no packet-information prefix) in `netns`: the device lives
/// there, and goes away when the returned descriptor is closed.
fn open(netns: &Netns, name: &str) -> io::Result<File> {
    let name = name.to_string();
    // The device belongs to the namespace of the thread that makes it, so only this call runs
    // inside; the descriptor is used from any thread afterwards.
    netns.run(move || {
        // SAFETY: `ifreq` is plain C data (a name array and a union of integers, arrays and a
        // pointer left null), for which all-zero bytes are the empty name and no flags.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        if name.len() >= req.ifr_name.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is too long for a device name"),
            ));
        }
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        let file = tun_control()?;
        // SAFETY: TUNSETIFF reads and writes one `ifreq`, which `req` is, alive for the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(file)
    })
}

/// The TUN control device. Where `tun` is a module not loaded yet (a freshly booted VM), the
/// device node is missing until the module is loaded.
fn tun_control() -> io::Result<File> {
    let open = || OpenOptions::new().read(true).write(true).open(TUN_CONTROL);
    match open() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let loaded = std::process::Command::new("modprobe").arg("tun").status();
            open().map_err(|e| {
                io::Error::new(e.kind(), format!("{TUN_CONTROL} ({e}), modprobe tun: {loaded:?}"))
            })
        }
        other => other,
    }
}

/// What crossed the link in one direction.
#[derive(Default)]
struct Counts {
    packets: AtomicU64,
    /// Packets that do not start with an IPv4 or IPv6 header (an Ethernet header pushed onto
    /// a packet sent out of an L3 device, for one).
    not_ip: AtomicU64,
}

impl Counts {
    fn note(&self, packet: &[u8]) {
        self.packets.fetch_add(1, Ordering::Relaxed);
        if !matches!(packet.first().map(|b| b >> 4), Some(4 | 6)) {
            self.not_ip.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn describe(&self, direction: &str) -> String {
        format!(
            "{direction}: {} packets ({} not starting with an IP header)",
            self.packets.load(Ordering::Relaxed),
            self.not_ip.load(Ordering::Relaxed)
        )
    }
}

/// Two TUN devices and the thread copying packets between them; dropping it stops the thread
/// and closes both descriptors, which removes the devices.
pub struct TunPair {
    left: String,
    right: String,
    stop: Arc<AtomicBool>,
    counts: Arc<[Counts; 2]>,
    pump: Option<JoinHandle<()>>,
}

impl TunPair {
    /// TUN device `left` in `left_ns` and `right` in `right_ns`, linked. Addresses and routes
    /// are the caller's (`ip` on the devices, which are down until set up).
    pub fn create(left_ns: &Netns, left: &str, right_ns: &Netns, right: &str) -> io::Result<Self> {
        let files = [open(left_ns, left)?, open(right_ns, right)?];
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new([Counts::default(), Counts::default()]);
        let pump = std::thread::Builder::new()
            .name(format!("tun {left}<->{right}"))
            .spawn({
                let (stop, counts) = (stop.clone(), counts.clone());
                move || pump(files, &stop, &counts)
            })?;
        Ok(Self {
            left: left.to_string(),
            right: right.to_string(),
            stop,
            counts,
            pump: Some(pump),
        })
    }

    /// How many packets crossed each way, for failure messages.
    pub fn report(&self) -> String {
        format!(
            "TUN link {l}<->{r}: {}; {}",
            self.counts[0].describe(&format!("{l}->{r}", l = self.left, r = self.right)),
            self.counts[1].describe(&format!("{r}->{l}", l = self.left, r = self.right)),
            l = self.left,
            r = self.right,
        )
    }
}

impl Drop for TunPair {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(pump) = self.pump.take() {
            let _ = pump.join();
        }
    }
}

/// Copies every packet read from one descriptor to the other until `stop` is set (or
/// `MAX_LIFE` has passed), waking at least every `POLL_MS` to look. A packet the other side
/// refuses (its device down, say) is dropped, as a wire would.
fn pump(mut files: [File; 2], stop: &AtomicBool, counts: &[Counts; 2]) {
    let started = Instant::now();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_LIFE {
        let mut fds = files.each_ref().map(|f| libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: `fds` is an array of two initialised pollfd, alive for the call, and its
        // length is passed.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, POLL_MS) };
        if ready <= 0 {
            continue;
        }
        // Neither descriptor can hang up while this thread owns both: an error here is for
        // good, and waiting on would spin.
        if fds
            .iter()
            .any(|f| f.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0)
        {
            return;
        }
        for from in 0..2 {
            if fds[from].revents & libc::POLLIN == 0 {
                continue;
            }
            let Ok(n) = files[from].read(&mut buf) else {
                continue;
            };
            counts[from].note(&buf[..n]);
            let _ = files[1 - from].write(&buf[..n]);
        }
    }
}

//! Reading a microvm.nix runner (a store path `microvm-<hypervisor>-<hostname>`)
//! into a typed [`Runner`].
//!
//! The runner's `passthru` attributes (hypervisor, `canShutdown`,
//! `tapMultiQueue`, …) exist only at Nix evaluation time; a driver that is
//! handed a store path has to derive the same facts from `bin/` and the data
//! files in `share/microvm/`. Runners of every age must work: `tap-flags`
//! appeared in v0.5.0, the `bin/` helper scripts in late 2024, `hypervisor` and
//! `vsock-cid` in 2026-01, and a minimal runner has nothing but
//! `bin/microvm-run`. Everything is validated here, once, because the values
//! end up in interface names, sysfs paths and kernel calls made as root.

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The script every runner has; it execs the VMM.
const MICROVM_RUN: &str = "bin/microvm-run";
/// Present only when the hypervisor can power the guest off gracefully.
const MICROVM_SHUTDOWN: &str = "bin/microvm-shutdown";
/// Starts supervisord with the per-share virtiofsd programs.
const VIRTIOFSD_RUN: &str = "bin/virtiofsd-run";
/// The data files' directory, relative to the runner.
const DATA_DIR: &str = "share/microvm";
/// Only runners built since late 2024 ship these (see [`Layout`]).
const CURRENT_LAYOUT_MARKERS: [&str; 5] =
    ["bin/tap-up", "bin/macvtap-up", "bin/virtiofsd-run", "bin/pci-setup", "share/microvm/hypervisor"];
/// The modes microvm.nix's `macvtap.mode` option allows (= `ip link … type macvtap mode`).
const MACVTAP_MODES: [&str; 5] = ["private", "vepa", "bridge", "passthru", "source"];
/// Linux's IFNAMSIZ minus the terminating NUL.
const MAX_IFNAME_LEN: usize = 15;

/// A VMM microvm.nix can build a runner for (`lib/default.nix`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hypervisor {
    Qemu,
    CloudHypervisor,
    Firecracker,
    Crosvm,
    Kvmtool,
    Stratovirt,
    Alioth,
    Vfkit,
}

impl Hypervisor {
    /// Every hypervisor, in microvm.nix's order.
    pub const ALL: [Hypervisor; 8] = [
        Hypervisor::Qemu,
        Hypervisor::CloudHypervisor,
        Hypervisor::Firecracker,
        Hypervisor::Crosvm,
        Hypervisor::Kvmtool,
        Hypervisor::Stratovirt,
        Hypervisor::Alioth,
        Hypervisor::Vfkit,
    ];

    /// The name microvm.nix uses (`microvm.hypervisor`, store names, `share/microvm/hypervisor`).
    pub fn name(self) -> &'static str {
        match self {
            Hypervisor::Qemu => "qemu",
            Hypervisor::CloudHypervisor => "cloud-hypervisor",
            Hypervisor::Firecracker => "firecracker",
            Hypervisor::Crosvm => "crosvm",
            Hypervisor::Kvmtool => "kvmtool",
            Hypervisor::Stratovirt => "stratovirt",
            Hypervisor::Alioth => "alioth",
            Hypervisor::Vfkit => "vfkit",
        }
    }

    /// The hypervisor called `name`, if microvm.nix knows it.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|hv| hv.name() == name)
    }

    /// Whether microvm.nix can give this hypervisor a `bin/microvm-shutdown`
    /// (it also needs `microvm.socket`, so check [`Runner::can_shutdown`] for a
    /// concrete runner). kvmtool, stratovirt and alioth can only be killed.
    pub fn has_graceful_shutdown(self) -> bool {
        matches!(
            self,
            Hypervisor::Qemu
                | Hypervisor::CloudHypervisor
                | Hypervisor::Firecracker
                | Hypervisor::Crosvm
                | Hypervisor::Vfkit
        )
    }

    /// Whether the guest's vsock CID is a kernel AF_VSOCK address, which must
    /// be unique on the host (a duplicate fails the second VM at start).
    /// cloud-hypervisor and firecracker multiplex vsock over a per-VM socket.
    pub fn kernel_vsock(self) -> bool {
        matches!(self, Hypervisor::Qemu | Hypervisor::Crosvm | Hypervisor::Kvmtool | Hypervisor::Alioth)
    }
}

impl fmt::Display for Hypervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the host must prepare the VM.
///
/// `Legacy` also covers recent runners that need no helper at all (no taps,
/// macvtaps, shares or PCI devices, built before `share/microvm/hypervisor`
/// existed); the distinction only matters when there is something to set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Ships `bin/{tap-up,macvtap-up,virtiofsd-run,pci-setup}` as needed
    /// (late 2024 on) or `share/microvm/hypervisor` (2026-01 on).
    Current,
    /// Data files only (≤ v0.5.0); the host did all the work (reference §2.5).
    Legacy,
}

/// Flags the runner's taps must be created with.
///
/// `multi_queue` must match what the VMM asks for: the kernel refuses to
/// attach a multi-queue open to a single-queue tap and vice versa.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapFlags {
    pub vnet_hdr: bool,
    pub multi_queue: bool,
}

impl TapFlags {
    /// For runners without `tap-flags` (before v0.5.0). That release added the
    /// file together with multi-queue taps, so older runners only ever used
    /// single-queue taps; `vnet_hdr` is what every later runner writes, and the
    /// kernel takes it from each VMM open anyway, so setting it cannot hurt.
    pub const PRE_V0_5: TapFlags = TapFlags { vnet_hdr: true, multi_queue: false };
}

/// One line of `share/microvm/macvtap-interfaces`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Macvtap {
    /// The macvtap interface to create.
    pub id: String,
    /// Its MAC address, `xx:xx:xx:xx:xx:xx`.
    pub mac: String,
    /// The existing host interface it sits on.
    pub link: String,
    /// One of `private`, `vepa`, `bridge`, `passthru`, `source`.
    pub mode: String,
}

/// One `share/microvm/virtiofs/<tag>/` directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtiofsShare {
    pub tag: String,
    /// As written; usually relative to the VM's working directory.
    pub socket: PathBuf,
    /// As written; absolute, or relative to the VM's working directory.
    pub source: PathBuf,
}

/// Everything the host needs to know about a runner before starting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runner {
    /// The runner directory with symlinks resolved (e.g. `current` → the store
    /// path), so it names exactly the generation that was read.
    pub path: PathBuf,
    /// The guest's `networking.hostName`; default socket names derive from it
    /// (`<host>.sock`, `<host>-virtiofs-<tag>.sock`) and so does argv0
    /// `microvm@<host>`.
    pub hostname: String,
    pub hypervisor: Hypervisor,
    pub layout: Layout,
    /// Tap interface names, in file order.
    pub taps: Vec<String>,
    pub tap_flags: TapFlags,
    pub macvtaps: Vec<Macvtap>,
    /// Sorted by tag.
    pub shares: Vec<VirtiofsShare>,
    /// PCI addresses to bind to vfio-pci, e.g. `0000:01:00.0`.
    pub pci_devices: Vec<String>,
    /// qemu `usb-host` specs, e.g. `vendorid=0x1234,productid=0x5678`.
    pub usb_devices: Vec<String>,
    /// Host-unique when [`Hypervisor::kernel_vsock`].
    pub vsock_cid: Option<u32>,
    /// `bin/microvm-shutdown` exists.
    pub can_shutdown: bool,
    /// The supervisord INI that `bin/virtiofsd-run` starts supervisord with,
    /// as written in the script (a store path). It holds the per-share
    /// virtiofsd flags (`--readonly`, `--cache`, …) that no data file records.
    pub virtiofsd_config: Option<PathBuf>,
}

/// Why a path could not be read as a runner.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("runner {} does not exist", .path.display())]
    NotFound { path: PathBuf },
    #[error("cannot access runner {}", .path.display())]
    Access {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("runner {} is not a directory", .path.display())]
    NotADirectory { path: PathBuf },
    #[error("{} is not a microvm.nix runner: bin/microvm-run is missing", .path.display())]
    NotARunner { path: PathBuf },
    #[error("{} is a dangling symlink (is the runner's closure on this node?)", .path.display())]
    DanglingLink { path: PathBuf },
    #[error("cannot read {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} names unknown hypervisor `{name}`", .path.display())]
    UnknownHypervisor { path: PathBuf, name: String },
    #[error(
        "cannot tell the hypervisor of runner {}: it has no share/microvm/hypervisor and its name \
         `{name}` is not microvm-<hypervisor>-<hostname> with a known hypervisor",
        .path.display()
    )]
    HypervisorNotInName { path: PathBuf, name: String },
    #[error(
        "cannot tell the hostname of runner {}: neither its name nor the target of \
         bin/microvm-run has the form microvm-<hypervisor>-<hostname>",
        .path.display()
    )]
    NoHostname { path: PathBuf },
    #[error("{} must hold exactly one value but holds {found}", .path.display())]
    NotOneValue { path: PathBuf, found: usize },
    #[error("{} line {line}: interface name `{name}` is invalid: {reason}", .path.display())]
    BadInterfaceName { path: PathBuf, line: usize, name: String, reason: &'static str },
    #[error("runner {} declares interface `{name}` twice", .path.display())]
    DuplicateInterface { path: PathBuf, name: String },
    #[error("{} line {line}: {reason}", .path.display())]
    MalformedMacvtap { path: PathBuf, line: usize, reason: String },
    #[error("{}: unknown tap flag `{flag}` (expected vnet_hdr or multi_queue)", .path.display())]
    UnknownTapFlag { path: PathBuf, flag: String },
    #[error("{} line {line}: `{value}` is not a PCI address like 0000:01:00.0", .path.display())]
    BadPciAddress { path: PathBuf, line: usize, value: String },
    #[error(
        "{}: `{value}` is not a usable vsock CID (expected a decimal number from 3 to 4294967294)",
        .path.display()
    )]
    BadVsockCid { path: PathBuf, value: String },
    #[error("virtiofs share {} has no `{missing}` file", .dir.display())]
    IncompleteShare { dir: PathBuf, missing: &'static str },
    #[error("the name of {} is not valid UTF-8", .path.display())]
    NonUtf8Name { path: PathBuf },
    #[error(
        "{} does not pass --configuration to supervisord, so the per-share virtiofsd flags are unknown",
        .path.display()
    )]
    NoVirtiofsdConfiguration { path: PathBuf },
}

impl Runner {
    /// Reads and validates the runner at `path` (a store path or a symlink to one).
    pub fn read(path: &Path) -> Result<Runner, RunnerError> {
        let root = resolve_runner_dir(path)?;
        if !entry_present(&root.join(MICROVM_RUN))? {
            return Err(RunnerError::NotARunner { path: root });
        }
        let data = root.join(DATA_DIR);
        let (hypervisor, hostname) = identify(&root, &data)?;
        let taps = read_taps(&data.join("tap-interfaces"))?;
        let macvtaps = read_macvtaps(&data.join("macvtap-interfaces"))?;
        check_unique_interfaces(&root, &taps, &macvtaps)?;
        let virtiofsd_config = read_virtiofsd_config(&root.join(VIRTIOFSD_RUN))?;
        Ok(Runner {
            hostname,
            hypervisor,
            layout: detect_layout(&root)?,
            taps,
            tap_flags: read_tap_flags(&data.join("tap-flags"))?,
            macvtaps,
            shares: read_shares(&data.join("virtiofs"))?,
            pci_devices: read_pci_devices(&data.join("pci-devices"))?,
            usb_devices: read_lines(&data.join("usb-devices"))?.into_iter().map(|(_, value)| value).collect(),
            vsock_cid: read_vsock_cid(&data.join("vsock-cid"))?,
            can_shutdown: entry_present(&root.join(MICROVM_SHUTDOWN))?,
            virtiofsd_config,
            path: root,
        })
    }

    /// `bin/microvm-run`: execs the VMM (run it as the VMM user, in the VM's directory).
    pub fn microvm_run(&self) -> PathBuf {
        self.path.join(MICROVM_RUN)
    }

    /// `bin/microvm-shutdown`, if the runner has one.
    pub fn microvm_shutdown(&self) -> Option<PathBuf> {
        self.can_shutdown.then(|| self.path.join(MICROVM_SHUTDOWN))
    }
}

/// Checks that `path` is a directory and resolves it, so that `current`-style
/// links yield the store name (which carries hypervisor and hostname).
fn resolve_runner_dir(path: &Path) -> Result<PathBuf, RunnerError> {
    let metadata = match fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(if fs::symlink_metadata(path).is_ok() {
                RunnerError::DanglingLink { path: path.into() }
            } else {
                RunnerError::NotFound { path: path.into() }
            });
        }
        Err(source) => {
            return Err(RunnerError::Access { path: path.into(), source });
        }
    };
    if !metadata.is_dir() {
        return Err(RunnerError::NotADirectory { path: path.into() });
    }
    fs::canonicalize(path).map_err(|source| RunnerError::Access { path: path.into(), source })
}

/// Whether `path` exists. `bin/*` are symlinks into the store, so a link whose
/// target is gone means an unrealised closure, which is an error, not absence.
fn entry_present(path: &Path) -> Result<bool, RunnerError> {
    match fs::metadata(path) {
        Ok(_) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            if fs::symlink_metadata(path).is_ok() {
                Err(RunnerError::DanglingLink { path: path.into() })
            } else {
                Ok(false)
            }
        }
        Err(source) => Err(RunnerError::Read { path: path.into(), source }),
    }
}

fn detect_layout(root: &Path) -> Result<Layout, RunnerError> {
    for marker in CURRENT_LAYOUT_MARKERS {
        if entry_present(&root.join(marker))? {
            return Ok(Layout::Current);
        }
    }
    Ok(Layout::Legacy)
}

/// Reads a data file; `None` if it does not exist (most are optional).
fn read_optional(path: &Path) -> Result<Option<String>, RunnerError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RunnerError::Read { path: path.into(), source }),
    }
}

/// The non-empty lines of `text`, trimmed, with 1-based line numbers.
/// Data files are written with `echo`, so every line ends in `\n`.
fn value_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().map(|(index, line)| (index + 1, line.trim())).filter(|(_, line)| !line.is_empty())
}

/// The numbered values of an optional one-value-per-line file.
fn read_lines(path: &Path) -> Result<Vec<(usize, String)>, RunnerError> {
    let text = read_optional(path)?.unwrap_or_default();
    Ok(value_lines(&text).map(|(line, value)| (line, value.to_owned())).collect())
}

/// The value of an optional file that must hold exactly one.
fn read_single(path: &Path) -> Result<Option<String>, RunnerError> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    let values: Vec<&str> = value_lines(&text).map(|(_, value)| value).collect();
    match values.as_slice() {
        [value] => Ok(Some((*value).to_owned())),
        _ => Err(RunnerError::NotOneValue { path: path.into(), found: values.len() }),
    }
}

/// Hypervisor and hostname. `share/microvm/hypervisor` is authoritative when
/// present; older runners only have the store name `microvm-<hv>-<host>`.
fn identify(root: &Path, data: &Path) -> Result<(Hypervisor, String), RunnerError> {
    let name = file_name(root)?;
    let from_name = split_runner_name(strip_store_hash(&name));
    let hv_file = data.join("hypervisor");
    let hypervisor = match (read_single(&hv_file)?, &from_name) {
        (Some(value), _) => {
            Hypervisor::from_name(&value).ok_or(RunnerError::UnknownHypervisor { path: hv_file, name: value })?
        }
        (None, Some((hv, _))) => *hv,
        (None, None) => {
            return Err(RunnerError::HypervisorNotInName { path: root.into(), name });
        }
    };
    let hostname = match from_name {
        Some((_, host)) => host.to_owned(),
        None => hostname_from_run_script(&root.join(MICROVM_RUN))
            .ok_or_else(|| RunnerError::NoHostname { path: root.into() })?,
    };
    Ok((hypervisor, hostname))
}

fn file_name(path: &Path) -> Result<String, RunnerError> {
    path.file_name()
        .unwrap_or(path.as_os_str())
        .to_str()
        .map(str::to_owned)
        .ok_or_else(|| RunnerError::NonUtf8Name { path: path.into() })
}

/// Drops a Nix store hash (`<32 chars of Nix base32>-`) from a store name.
fn strip_store_hash(name: &str) -> &str {
    const NIX_BASE32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let bytes = name.as_bytes();
    let is_hash = bytes.len() > 33 && bytes[32] == b'-' && bytes[..32].iter().all(|b| NIX_BASE32.contains(b));
    if is_hash { &name[33..] } else { name }
}

/// Splits `microvm-<hv>-<host>`. Names of hypervisors contain `-`, and so may
/// hostnames, so known names are tried longest first: that way a hypervisor
/// whose name extends another's (`cloud-hypervisor` vs a future `cloud`) wins.
fn split_runner_name(name: &str) -> Option<(Hypervisor, &str)> {
    let rest = name.strip_prefix("microvm-")?;
    let mut known = Hypervisor::ALL;
    known.sort_by_key(|hv| std::cmp::Reverse(hv.name().len()));
    known.into_iter().find_map(|hv| {
        let host = rest.strip_prefix(hv.name())?.strip_prefix('-')?;
        (!host.is_empty()).then_some((hv, host))
    })
}

/// `bin/microvm-run` links to a script named `microvm-<host>-microvm-run`,
/// which still carries the hostname when the runner directory was renamed.
fn hostname_from_run_script(link: &Path) -> Option<String> {
    let target = fs::read_link(link).ok()?;
    let name = strip_store_hash(target.file_name()?.to_str()?);
    let host = name.strip_prefix("microvm-")?.strip_suffix("-microvm-run")?;
    (!host.is_empty()).then(|| host.to_owned())
}

/// Why `name` cannot be a Linux interface name (the kernel's `dev_valid_name`).
fn interface_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_IFNAME_LEN {
        Some("it is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("it is `.` or `..`")
    } else if name.chars().any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace()) {
        Some("it contains `/`, `:`, whitespace or NUL")
    } else {
        None
    }
}

fn check_interface_name(path: &Path, line: usize, name: &str) -> Result<(), RunnerError> {
    match interface_name_problem(name) {
        None => Ok(()),
        Some(reason) => Err(RunnerError::BadInterfaceName { path: path.into(), line, name: name.into(), reason }),
    }
}

fn read_taps(path: &Path) -> Result<Vec<String>, RunnerError> {
    read_lines(path)?.into_iter().map(|(line, id)| check_interface_name(path, line, &id).map(|()| id)).collect()
}

/// Whitespace-separated so that one-line and one-flag-per-line files both
/// work, like the legacy unit's unquoted `$TAP_FLAGS`.
fn read_tap_flags(path: &Path) -> Result<TapFlags, RunnerError> {
    let Some(text) = read_optional(path)? else {
        return Ok(TapFlags::PRE_V0_5);
    };
    let mut flags = TapFlags { vnet_hdr: false, multi_queue: false };
    for flag in text.split_whitespace() {
        match flag {
            "vnet_hdr" => flags.vnet_hdr = true,
            "multi_queue" => flags.multi_queue = true,
            // An unknown flag would be silently missing from our taps and
            // surface later as an obscure EINVAL from the VMM.
            _ => {
                return Err(RunnerError::UnknownTapFlag { path: path.into(), flag: flag.into() });
            }
        }
    }
    Ok(flags)
}

fn read_macvtaps(path: &Path) -> Result<Vec<Macvtap>, RunnerError> {
    read_lines(path)?.into_iter().map(|(line, text)| parse_macvtap(path, line, &text)).collect()
}

/// Parses `<id> <mac> <link> <mode>`.
fn parse_macvtap(path: &Path, line: usize, text: &str) -> Result<Macvtap, RunnerError> {
    let malformed = |reason: String| RunnerError::MalformedMacvtap { path: path.into(), line, reason };
    let fields: Vec<&str> = text.split_whitespace().collect();
    let [id, mac, link, mode] = fields.as_slice() else {
        return Err(malformed(format!("expected `<id> <mac> <link> <mode>`, found `{text}`")));
    };
    check_interface_name(path, line, id)?;
    check_interface_name(path, line, link)?;
    if !is_mac_address(mac) {
        return Err(malformed(format!("`{mac}` is not a MAC address like 02:00:00:00:00:01")));
    }
    if !MACVTAP_MODES.contains(mode) {
        return Err(malformed(format!("unknown macvtap mode `{mode}` (expected one of {})", MACVTAP_MODES.join(", "))));
    }
    Ok(Macvtap { id: (*id).into(), mac: (*mac).into(), link: (*link).into(), mode: (*mode).into() })
}

fn is_mac_address(text: &str) -> bool {
    let octets: Vec<&str> = text.split(':').collect();
    octets.len() == 6 && octets.iter().all(|octet| octet.len() == 2 && octet.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Tap and macvtap names share the host's interface namespace.
fn check_unique_interfaces(root: &Path, taps: &[String], macvtaps: &[Macvtap]) -> Result<(), RunnerError> {
    let mut seen = HashSet::new();
    let names = taps.iter().chain(macvtaps.iter().map(|m| &m.id));
    for name in names {
        if !seen.insert(name) {
            return Err(RunnerError::DuplicateInterface { path: root.into(), name: name.clone() });
        }
    }
    Ok(())
}

/// One share per subdirectory of `virtiofs/`, sorted by tag.
fn read_shares(dir: &Path) -> Result<Vec<VirtiofsShare>, RunnerError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(RunnerError::Read { path: dir.into(), source });
        }
    };
    let mut shares = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| RunnerError::Read { path: dir.into(), source })?;
        let share_dir = entry.path();
        if share_dir.is_dir() {
            shares.push(read_share(&share_dir)?);
        }
    }
    shares.sort_by(|a, b| a.tag.cmp(&b.tag));
    Ok(shares)
}

fn read_share(dir: &Path) -> Result<VirtiofsShare, RunnerError> {
    let required = |missing: &'static str| -> Result<PathBuf, RunnerError> {
        read_single(&dir.join(missing))?
            .map(PathBuf::from)
            .ok_or_else(|| RunnerError::IncompleteShare { dir: dir.into(), missing })
    };
    Ok(VirtiofsShare { tag: file_name(dir)?, socket: required("socket")?, source: required("source")? })
}

/// The addresses end up in `/sys/bus/pci/devices/<address>/…` paths written
/// as root, so only the sysfs form `<domain>:<bus>:<device>.<function>` passes.
fn read_pci_devices(path: &Path) -> Result<Vec<String>, RunnerError> {
    read_lines(path)?
        .into_iter()
        .map(|(line, value)| {
            if is_pci_address(&value) {
                Ok(value)
            } else {
                Err(RunnerError::BadPciAddress { path: path.into(), line, value })
            }
        })
        .collect()
}

fn is_pci_address(text: &str) -> bool {
    let hex = |s: &str, len: std::ops::RangeInclusive<usize>| {
        len.contains(&s.len()) && s.chars().all(|c| c.is_ascii_hexdigit())
    };
    let mut parts = text.split(':');
    let (Some(domain), Some(bus), Some(slot), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let Some((device, function)) = slot.split_once('.') else {
        return false;
    };
    // Domains are 4 hex digits, or more on hosts with VMD (`10000:`).
    hex(domain, 4..=8)
        && hex(bus, 2..=2)
        && hex(device, 2..=2)
        && matches!(function, "0" | "1" | "2" | "3" | "4" | "5" | "6" | "7")
}

/// CIDs 0–2 are the hypervisor, loopback and host; `u32::MAX` is `VMADDR_CID_ANY`.
fn read_vsock_cid(path: &Path) -> Result<Option<u32>, RunnerError> {
    let Some(value) = read_single(path)? else {
        return Ok(None);
    };
    match value.parse::<u32>() {
        Ok(cid) if (3..u32::MAX).contains(&cid) => Ok(Some(cid)),
        _ => Err(RunnerError::BadVsockCid { path: path.into(), value }),
    }
}

/// The supervisord INI named by `bin/virtiofsd-run`. A script without one is
/// an error rather than "use defaults": falling back to default virtiofsd
/// flags would, for instance, silently make a read-only share writable.
fn read_virtiofsd_config(script: &Path) -> Result<Option<PathBuf>, RunnerError> {
    if !entry_present(script)? {
        return Ok(None);
    }
    // `read_to_string` follows the symlink into the store.
    let text = fs::read_to_string(script).map_err(|source| RunnerError::Read { path: script.into(), source })?;
    configuration_argument(&text).map(Some).ok_or_else(|| RunnerError::NoVirtiofsdConfiguration { path: script.into() })
}

/// Finds `--configuration PATH` or `--configuration=PATH` in a shell script
/// of the form `exec <supervisord> --configuration <path> "$@"`.
fn configuration_argument(script: &str) -> Option<PathBuf> {
    let code_lines = script.lines().map(str::trim).filter(|line| !line.starts_with('#'));
    for line in code_lines {
        let mut words = line.split_whitespace();
        while let Some(word) = words.next() {
            let value = match word.strip_prefix("--configuration") {
                Some("") => words.next(),
                Some(rest) => rest.strip_prefix('='),
                None => None,
            };
            if let Some(value) = value.map(unquote).filter(|v| !v.is_empty()) {
                return Some(PathBuf::from(value));
            }
        }
    }
    None
}

/// Drops one pair of matching surrounding quotes (store paths need none, but
/// a hand-written script may quote them).
fn unquote(word: &str) -> &str {
    ['\'', '"'].into_iter().find_map(|q| word.strip_prefix(q)?.strip_suffix(q)).unwrap_or(word)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use tempfile::TempDir;

    const HASH: &str = "0123456789abcdfghijklmnpqrsvwxyz";

    /// Builds a runner directory the way `lib/runner.nix` does: `bin/*` are
    /// symlinks to scripts elsewhere (a fake store), data files under
    /// `share/microvm/`.
    struct Builder {
        tmp: TempDir,
        root: PathBuf,
    }

    impl Builder {
        /// A runner named `name` with `bin/microvm-run` linking to
        /// `store/<hash>-microvm-<host>-microvm-run` when `host` is given.
        fn new(name: &str) -> Self {
            let tmp = TempDir::new().expect("temp dir");
            let root = tmp.path().join(name);
            fs::create_dir_all(root.join("bin")).expect("bin dir");
            fs::create_dir_all(tmp.path().join("store")).expect("store dir");
            let builder = Builder { tmp, root };
            let host = split_runner_name(strip_store_hash(name)).map(|(_, host)| host.to_owned());
            let script_host = host.unwrap_or_else(|| "renamed".to_owned());
            builder.link_script("microvm-run", &script_host, "exec qemu\n")
        }

        /// `bin/<name>` → `store/<hash>-microvm-<host>-<name>` containing `text`.
        fn link_script(self, name: &str, host: &str, text: &str) -> Self {
            let script = self.tmp.path().join("store").join(format!("{HASH}-microvm-{host}-{name}"));
            fs::write(&script, text).expect("write script");
            symlink(&script, self.root.join("bin").join(name)).expect("symlink");
            self
        }

        fn bin(self, name: &str, text: &str) -> Self {
            self.link_script(name, "vm", text)
        }

        /// Writes `share/microvm/<rel>`.
        fn data(self, rel: &str, text: &str) -> Self {
            let path = self.root.join(DATA_DIR).join(rel);
            fs::create_dir_all(path.parent().expect("parent")).expect("data dir");
            fs::write(path, text).expect("write data file");
            self
        }

        fn read(&self) -> Result<Runner, RunnerError> {
            Runner::read(&self.root)
        }

        fn runner(&self) -> Runner {
            self.read().expect("runner should read")
        }
    }

    fn qemu() -> Builder {
        Builder::new("microvm-qemu-vm")
    }

    #[test]
    fn hypervisor_names_round_trip() {
        for hv in Hypervisor::ALL {
            assert_eq!(Hypervisor::from_name(hv.name()), Some(hv));
            assert_eq!(hv.to_string(), hv.name());
            let json = serde_json::to_string(&hv).expect("serialize");
            assert_eq!(json, format!("\"{}\"", hv.name()));
        }
        assert_eq!(Hypervisor::from_name("cloud"), None);
        assert_eq!(Hypervisor::from_name("QEMU"), None);
    }

    #[test]
    fn hypervisor_capabilities() {
        let graceful: Vec<_> =
            Hypervisor::ALL.into_iter().filter(|hv| hv.has_graceful_shutdown()).map(Hypervisor::name).collect();
        assert_eq!(graceful, ["qemu", "cloud-hypervisor", "firecracker", "crosvm", "vfkit"]);
        let kernel: Vec<_> = Hypervisor::ALL.into_iter().filter(|hv| hv.kernel_vsock()).map(Hypervisor::name).collect();
        assert_eq!(kernel, ["qemu", "crosvm", "kvmtool", "alioth"]);
    }

    #[test]
    fn every_hypervisor_from_store_name() {
        for hv in Hypervisor::ALL {
            for host in ["vm", "my-web-vm", "cloud-hypervisor-x"] {
                let name = format!("{HASH}-microvm-{}-{host}", hv.name());
                let runner = Builder::new(&name).runner();
                assert_eq!((runner.hypervisor, runner.hostname.as_str()), (hv, host));
                assert_eq!(runner.layout, Layout::Legacy);
            }
        }
    }

    #[test]
    fn every_hypervisor_from_file() {
        for hv in Hypervisor::ALL {
            let builder = Builder::new("microvm-qemu-a-b").data("hypervisor", &format!("{}\n", hv.name()));
            let runner = builder.runner();
            assert_eq!(runner.hypervisor, hv);
            assert_eq!(runner.hostname, "a-b");
            assert_eq!(runner.layout, Layout::Current);
        }
    }

    #[test]
    fn store_name_splitting() {
        assert_eq!(split_runner_name("microvm-cloud-hypervisor-web-1"), Some((Hypervisor::CloudHypervisor, "web-1")));
        assert_eq!(split_runner_name("microvm-qemu-"), None);
        assert_eq!(split_runner_name("microvm-qemux-vm"), None);
        assert_eq!(split_runner_name("runner-qemu-vm"), None);
        assert_eq!(strip_store_hash(&format!("{HASH}-microvm-qemu-vm")), "microvm-qemu-vm");
        // `e` is not in Nix's base32 alphabet, so this is not a hash.
        let not_hash = format!("e{}-microvm-qemu-vm", &HASH[1..]);
        assert_eq!(strip_store_hash(&not_hash), not_hash);
    }

    #[test]
    fn hostname_from_script_when_renamed() {
        let builder = Builder::new("some-dir").data("hypervisor", "crosvm\n");
        let runner = builder.runner();
        assert_eq!(runner.hypervisor, Hypervisor::Crosvm);
        assert_eq!(runner.hostname, "renamed");
    }

    #[test]
    fn reads_through_current_symlink() {
        let builder = Builder::new(&format!("{HASH}-microvm-firecracker-fc-1"));
        let current = builder.tmp.path().join("current");
        symlink(&builder.root, &current).expect("symlink");
        let runner = Runner::read(&current).expect("runner");
        assert_eq!(runner.hypervisor, Hypervisor::Firecracker);
        assert_eq!(runner.hostname, "fc-1");
        assert_eq!(runner.path, builder.root);
        assert_eq!(runner.microvm_run(), builder.root.join("bin/microvm-run"));
    }

    #[test]
    fn minimal_runner() {
        let runner = qemu().runner();
        assert_eq!(runner.layout, Layout::Legacy);
        assert_eq!(runner.tap_flags, TapFlags { vnet_hdr: true, multi_queue: false });
        assert!(runner.taps.is_empty() && runner.macvtaps.is_empty() && runner.shares.is_empty());
        assert!(runner.pci_devices.is_empty() && runner.usb_devices.is_empty());
        assert_eq!(runner.vsock_cid, None);
        assert!(!runner.can_shutdown);
        assert_eq!(runner.microvm_shutdown(), None);
        assert_eq!(runner.virtiofsd_config, None);
    }

    #[test]
    fn current_layout_markers() {
        for bin in ["tap-up", "macvtap-up", "pci-setup"] {
            assert_eq!(qemu().bin(bin, "true\n").runner().layout, Layout::Current, "{bin}");
        }
        let runner = qemu().bin("virtiofsd-run", "exec sd --configuration /c \"$@\"\n").runner();
        assert_eq!(runner.layout, Layout::Current);
        // Data files alone (with a tap-down but no tap-up) are still legacy.
        let runner = qemu().data("tap-interfaces", "t0\n").bin("tap-down", "ip link delete t0\n").runner();
        assert_eq!(runner.layout, Layout::Legacy);
    }

    #[test]
    fn lines_are_trimmed_and_blank_lines_skipped() {
        let runner = qemu()
            .data("tap-interfaces", "\n  vm-a \n\n\tvm-b\r\nvm-c")
            .data("pci-devices", "0000:01:00.0")
            .data("usb-devices", "vendorid=0x1234,productid=0x5678\n\n")
            .runner();
        assert_eq!(runner.taps, ["vm-a", "vm-b", "vm-c"]);
        assert_eq!(runner.pci_devices, ["0000:01:00.0"]);
        assert_eq!(runner.usb_devices, ["vendorid=0x1234,productid=0x5678"]);
    }

    #[test]
    fn tap_flags() {
        let flags = |text: &str| qemu().data("tap-flags", text).runner().tap_flags;
        let single = TapFlags { vnet_hdr: true, multi_queue: false };
        let multi = TapFlags { vnet_hdr: true, multi_queue: true };
        assert_eq!(flags("vnet_hdr\n"), single);
        assert_eq!(flags("vnet_hdr\nmulti_queue\n"), multi);
        assert_eq!(flags("vnet_hdr multi_queue"), multi);
        assert_eq!(flags(""), TapFlags { vnet_hdr: false, multi_queue: false });
        let err = qemu().data("tap-flags", "vnet_hdr\none_queue\n").read().unwrap_err();
        assert!(matches!(&err, RunnerError::UnknownTapFlag { flag, .. } if flag == "one_queue"), "{err}");
    }

    #[test]
    fn macvtap_lines() {
        let runner = qemu()
            .data(
                "macvtap-interfaces",
                "mv-a 02:00:00:00:00:01 eth0 bridge\n\n  mv-b 02:AB:cd:00:00:02  enp1s0   passthru \n",
            )
            .runner();
        assert_eq!(
            runner.macvtaps,
            [
                Macvtap {
                    id: "mv-a".into(),
                    mac: "02:00:00:00:00:01".into(),
                    link: "eth0".into(),
                    mode: "bridge".into(),
                },
                Macvtap {
                    id: "mv-b".into(),
                    mac: "02:AB:cd:00:00:02".into(),
                    link: "enp1s0".into(),
                    mode: "passthru".into(),
                },
            ]
        );
    }

    #[test]
    fn malformed_macvtap_lines() {
        let cases = [
            ("mv-a 02:00:00:00:00:01 eth0\n", "expected `<id> <mac> <link> <mode>`"),
            ("mv-a 02:00:00:00:00:01 eth0 bridge extra\n", "expected `<id>"),
            ("mv-a 02:00:00:00:01 eth0 bridge\n", "is not a MAC address"),
            ("mv-a 02:00:00:00:00:0g eth0 bridge\n", "is not a MAC address"),
            ("mv-a 02:00:00:00:00:01 eth0 bridged\n", "unknown macvtap mode `bridged`"),
        ];
        for (text, expected) in cases {
            let text = format!("\n{text}");
            let err = qemu().data("macvtap-interfaces", &text).read().unwrap_err();
            let message = err.to_string();
            assert!(matches!(err, RunnerError::MalformedMacvtap { line: 2, .. }), "{message}");
            assert!(message.contains("macvtap-interfaces line 2: "), "{message}");
            assert!(message.contains(expected), "{message}");
        }
    }

    #[test]
    fn bad_interface_names() {
        let cases = [
            ("tap-interfaces", "a-very-long-name\n", "a-very-long-name", "longer than 15"),
            ("tap-interfaces", "ok\n../x\n", "../x", "contains `/`"),
            ("tap-interfaces", "vm:1\n", "vm:1", "contains `/`"),
            ("tap-interfaces", "a b\n", "a b", "whitespace"),
            ("tap-interfaces", "..\n", "..", "`.` or `..`"),
            ("macvtap-interfaces", "x/y 02:00:00:00:00:01 eth0 vepa\n", "x/y", "contains"),
            ("macvtap-interfaces", "mv 02:00:00:00:00:01 eth0/1 vepa\n", "eth0/1", "contains"),
        ];
        for (file, text, bad, reason) in cases {
            let err = qemu().data(file, text).read().unwrap_err();
            let message = err.to_string();
            assert!(matches!(&err, RunnerError::BadInterfaceName { name, .. } if name == bad), "{message}");
            assert!(message.contains(file) && message.contains(reason), "{message}");
        }
        // Exactly 15 bytes is the limit, not an error.
        let runner = qemu().data("tap-interfaces", "fifteen-bytes-x\n").runner();
        assert_eq!(runner.taps, ["fifteen-bytes-x"]);
    }

    #[test]
    fn duplicate_interface() {
        let err = qemu()
            .data("tap-interfaces", "vm-a\n")
            .data("macvtap-interfaces", "vm-a 02:00:00:00:00:01 eth0 bridge\n")
            .read()
            .unwrap_err();
        assert!(matches!(&err, RunnerError::DuplicateInterface { name, .. } if name == "vm-a"), "{err}");
    }

    #[test]
    fn shares() {
        let runner = qemu()
            .data("virtiofs/ro-store/socket", "vm-virtiofs-ro-store.sock\n")
            .data("virtiofs/ro-store/source", "/nix/store\n")
            .data("virtiofs/data/socket", "/run/vm/data.sock")
            .data("virtiofs/data/source", "data\n")
            .runner();
        assert_eq!(
            runner.shares,
            [
                VirtiofsShare { tag: "data".into(), socket: "/run/vm/data.sock".into(), source: "data".into() },
                VirtiofsShare {
                    tag: "ro-store".into(),
                    socket: "vm-virtiofs-ro-store.sock".into(),
                    source: "/nix/store".into(),
                },
            ]
        );
    }

    #[test]
    fn incomplete_share() {
        for (present, missing) in [("socket", "source"), ("source", "socket")] {
            let err = qemu().data(&format!("virtiofs/home/{present}"), "x\n").read().unwrap_err();
            assert!(
                matches!(&err, RunnerError::IncompleteShare { dir, missing: m }
                    if dir.ends_with("virtiofs/home") && *m == missing),
                "{err}"
            );
        }
        let err = qemu().data("virtiofs/home/socket", "\n").data("virtiofs/home/source", "/home\n").read().unwrap_err();
        assert!(matches!(err, RunnerError::NotOneValue { found: 0, .. }), "{err}");
    }

    #[test]
    fn vsock_cid() {
        let cid = |text: &str| qemu().data("vsock-cid", text).read();
        assert_eq!(cid("10914385\n").expect("cid").vsock_cid, Some(10_914_385));
        assert_eq!(cid("3").expect("cid").vsock_cid, Some(3));
        for bad in ["2\n", "0\n", "-5\n", "4294967295\n", "4294967296\n", "0x10\n", "abc\n"] {
            let err = cid(bad).unwrap_err();
            assert!(matches!(&err, RunnerError::BadVsockCid { value, .. } if value == bad.trim()), "{bad}: {err}");
        }
        let err = cid("3\n4\n").unwrap_err();
        assert!(matches!(err, RunnerError::NotOneValue { found: 2, .. }), "{err}");
    }

    #[test]
    fn pci_addresses() {
        let runner = qemu().data("pci-devices", "0000:01:00.0\n10000:e1:1f.7\n").runner();
        assert_eq!(runner.pci_devices, ["0000:01:00.0", "10000:e1:1f.7"]);
        for bad in ["01:00.0", "0000:01:00.8", "0000:01:00", "../../../x", "0000:01:00.0/x"] {
            let err = qemu().data("pci-devices", &format!("0000:02:00.0\n{bad}\n")).read().unwrap_err();
            assert!(matches!(&err, RunnerError::BadPciAddress { line: 2, value, .. } if value == bad), "{bad}: {err}");
        }
    }

    #[test]
    fn shutdown_script() {
        let runner = qemu().bin("microvm-shutdown", "socat …\n").runner();
        assert!(runner.can_shutdown);
        assert_eq!(runner.microvm_shutdown(), Some(runner.path.join("bin/microvm-shutdown")));
    }

    #[test]
    fn virtiofsd_configuration_forms() {
        let conf = "/nix/store/7mfww0f3h8z4m83dvgqyqwbgydr69bf6-vm-virtiofsd-supervisord.conf";
        let scripts = [
            format!(
                "#!/nix/store/x-bash/bin/bash\nexec /nix/store/y-supervisor/bin/supervisord --configuration {conf} \"$@\"\n"
            ),
            format!("#!/bin/sh\n\nexec /bin/supervisord --configuration={conf} \"$@\"\n"),
            format!("exec supervisord --nodaemon --configuration '{conf}'\n"),
        ];
        for script in scripts {
            let runner = qemu().bin("virtiofsd-run", &script).runner();
            assert_eq!(runner.virtiofsd_config, Some(PathBuf::from(conf)), "{script}");
        }
    }

    #[test]
    fn virtiofsd_run_without_configuration() {
        for script in ["exec supervisord \"$@\"\n", "# --configuration /c\nexec x --configuration\n"] {
            let err = qemu().bin("virtiofsd-run", script).read().unwrap_err();
            assert!(
                matches!(&err, RunnerError::NoVirtiofsdConfiguration { path }
                    if path.ends_with("bin/virtiofsd-run")),
                "{err}"
            );
        }
    }

    #[test]
    fn missing_path() {
        let tmp = TempDir::new().expect("temp dir");
        let path = tmp.path().join("microvm-qemu-gone");
        let err = Runner::read(&path).unwrap_err();
        assert!(matches!(err, RunnerError::NotFound { .. }), "{err}");
        assert_eq!(err.to_string(), format!("runner {} does not exist", path.display()));
    }

    #[test]
    fn dangling_links() {
        let tmp = TempDir::new().expect("temp dir");
        let link = tmp.path().join("current");
        symlink(tmp.path().join("gone"), &link).expect("symlink");
        let err = Runner::read(&link).unwrap_err();
        assert!(matches!(err, RunnerError::DanglingLink { .. }), "{err}");

        let builder = qemu();
        symlink("/nonexistent/script", builder.root.join("bin/microvm-shutdown")).expect("link");
        let err = builder.read().unwrap_err();
        assert!(matches!(&err, RunnerError::DanglingLink { path } if path.ends_with("bin/microvm-shutdown")), "{err}");
    }

    #[test]
    fn file_is_not_a_directory() {
        let tmp = TempDir::new().expect("temp dir");
        let path = tmp.path().join("microvm-qemu-vm");
        fs::write(&path, "").expect("write");
        let err = Runner::read(&path).unwrap_err();
        assert!(matches!(err, RunnerError::NotADirectory { .. }), "{err}");
    }

    #[test]
    fn no_microvm_run() {
        let tmp = TempDir::new().expect("temp dir");
        let path = tmp.path().join("microvm-qemu-vm");
        fs::create_dir_all(path.join("share/microvm")).expect("mkdir");
        let err = Runner::read(&path).unwrap_err();
        assert!(matches!(err, RunnerError::NotARunner { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!("{} is not a microvm.nix runner: bin/microvm-run is missing", path.display())
        );
    }

    #[test]
    fn unknown_hypervisor() {
        let err = Builder::new("microvm-bhyve-vm").read().unwrap_err();
        assert!(matches!(&err, RunnerError::HypervisorNotInName { name, .. } if name == "microvm-bhyve-vm"), "{err}");
        let err = qemu().data("hypervisor", "bhyve\n").read().unwrap_err();
        assert!(
            matches!(&err, RunnerError::UnknownHypervisor { name, path }
                if name == "bhyve" && path.ends_with("share/microvm/hypervisor")),
            "{err}"
        );
    }
}

//! What the driver reports to Nomad about this host: health, a description a
//! human can act on, and `driver.microvm.*` node attributes.
//!
//! Gathering facts (`HostFacts::gather`) touches the host; judging them
//! (`assess`) is pure, so every verdict is unit-tested without root.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use microvm_proto::drivers::{FingerprintResponse, fingerprint_response::HealthState};
use microvm_proto::structs::{Attribute, attribute::Value as AttrValue};

use crate::config::PluginConfig;
use crate::runner::Hypervisor;

/// What probing /dev/kvm found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kvm {
    Absent,
    /// The device exists but a trivial guest did not run; the text says why.
    Unusable(String),
    Usable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    pub is_root: bool,
    pub kvm: Kvm,
    pub tun: bool,
    pub vhost_net: bool,
    pub vhost_vsock: bool,
    /// The configured virtiofsd, resolved on PATH; `None` if not found.
    pub virtiofsd: Option<PathBuf>,
    pub nix: Option<PathBuf>,
    /// Problems with the VMM user/group, if any.
    pub vmm_identity: Result<(), String>,
    /// Problems creating/using the state dir, if any.
    pub state_dir: Result<(), String>,
    /// VMM binaries found on PATH (runners usually carry their own).
    pub hypervisors: Vec<&'static str>,
    /// "v2" (each VM in its task's cgroup, memory enforced), "v1" or "none".
    pub cgroups: &'static str,
}

/// Binaries that each hypervisor microvm.nix knows runs as.
fn hypervisor_binary(h: Hypervisor) -> &'static str {
    match h {
        Hypervisor::Qemu => "qemu-system-x86_64",
        Hypervisor::CloudHypervisor => "cloud-hypervisor",
        Hypervisor::Firecracker => "firecracker",
        Hypervisor::Crosvm => "crosvm",
        Hypervisor::Kvmtool => "lkvm",
        Hypervisor::Stratovirt => "stratovirt",
        Hypervisor::Alioth => "alioth",
        Hypervisor::Vfkit => "vfkit",
    }
}

/// Finds `program` the way a shell would: as given if it has a slash, else on PATH.
pub fn which(program: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable =
        |p: &Path| p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false);
    if program.components().count() > 1 || program.is_absolute() {
        return executable(program).then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| executable(p))
}

impl HostFacts {
    /// Probes the host. `kvm_probe` runs a tiny guest in a child process
    /// (a hung KVM must not hang the plugin).
    pub fn gather(config: &PluginConfig, kvm_probe: impl FnOnce() -> Kvm) -> HostFacts {
        let open_rw = |p: &str| std::fs::OpenOptions::new().read(true).write(true).open(p).is_ok();
        HostFacts {
            is_root: nix::unistd::geteuid().is_root(),
            kvm: kvm_probe(),
            tun: open_rw("/dev/net/tun"),
            vhost_net: Path::new("/dev/vhost-net").exists(),
            vhost_vsock: Path::new("/dev/vhost-vsock").exists(),
            virtiofsd: which(&config.virtiofsd),
            nix: which(&config.nix),
            vmm_identity: check_identity(&config.vmm_user, &config.vmm_group),
            state_dir: std::fs::create_dir_all(&config.state_dir)
                .map_err(|e| format!("cannot create state_dir {}: {e}", config.state_dir.display())),
            hypervisors: Hypervisor::ALL
                .iter()
                .filter(|h| which(Path::new(hypervisor_binary(**h))).is_some())
                .map(|h| h.name())
                .collect(),
            cgroups: crate::cgroup::host_version(),
        }
    }
}

fn check_identity(user: &str, group: &str) -> Result<(), String> {
    use nix::unistd::{Group, User};
    let user_ok = user.parse::<u32>().is_ok() || User::from_name(user).ok().flatten().is_some();
    let group_ok = group.parse::<u32>().is_ok() || Group::from_name(group).ok().flatten().is_some();
    match (user_ok, group_ok) {
        (true, true) => Ok(()),
        (false, _) => Err(format!(
            "VMM user {user:?} does not exist: create it (useradd --system --gid {group} {user}) or set vmm_user"
        )),
        (true, false) => Err(format!("VMM group {group:?} does not exist: create it or set vmm_group")),
    }
}

/// The fingerprint for these facts.
pub fn assess(facts: &HostFacts, config: &PluginConfig) -> FingerprintResponse {
    let mut attributes = HashMap::new();
    let mut put = |k: &str, v: AttrValue| {
        attributes.insert(format!("driver.microvm.{k}"), Attribute { value: Some(v), unit: String::new() });
    };
    put("version", AttrValue::StringVal(crate::VERSION.to_string()));
    put("kvm", AttrValue::BoolVal(facts.kvm == Kvm::Usable));
    put("vhost_net", AttrValue::BoolVal(facts.vhost_net));
    put("vhost_vsock", AttrValue::BoolVal(facts.vhost_vsock));
    put("hypervisors", AttrValue::StringVal(facts.hypervisors.join(",")));
    put("virtiofsd", AttrValue::BoolVal(facts.virtiofsd.is_some()));
    put("nix", AttrValue::BoolVal(facts.nix.is_some()));
    put("cgroups", AttrValue::StringVal(facts.cgroups.to_string()));
    if let Some(bridge) = &config.default_bridge {
        put("default_bridge", AttrValue::StringVal(bridge.clone()));
    }

    let (health, description) = verdict(facts, config);
    FingerprintResponse { attributes, health: health as i32, health_description: description, err: String::new() }
}

fn verdict(facts: &HostFacts, config: &PluginConfig) -> (HealthState, String) {
    if !facts.is_root {
        return (
            HealthState::Undetected,
            "not running as root: the microvm driver creates taps and starts virtiofsd, \
             so the Nomad client agent must run as root"
                .to_string(),
        );
    }
    let mut blockers = Vec::new();
    if !facts.tun {
        blockers.push("no usable /dev/net/tun: load the tun module (modprobe tun)".to_string());
    }
    if let Err(e) = &facts.vmm_identity {
        blockers.push(e.clone());
    }
    if let Err(e) = &facts.state_dir {
        blockers.push(e.clone());
    }
    if !blockers.is_empty() {
        return (HealthState::Unhealthy, blockers.join("; "));
    }
    let mut notes = Vec::new();
    match &facts.kvm {
        Kvm::Usable => {}
        Kvm::Absent => notes.push(
            "no /dev/kvm: only runners that allow TCG emulation (qemu accel=kvm:tcg) can start, slowly; \
             load kvm_intel or kvm_amd"
                .to_string(),
        ),
        Kvm::Unusable(why) => notes.push(format!(
            "KVM present but unusable ({why}): only runners that allow TCG emulation can start; \
             check nested virtualisation / BIOS settings"
        )),
    }
    if facts.virtiofsd.is_none() {
        notes.push(format!(
            "virtiofsd not found (virtiofsd = {:?}): runners with virtiofs shares cannot start",
            config.virtiofsd.display().to_string()
        ));
    }
    if notes.is_empty() {
        (HealthState::Healthy, "Healthy".to_string())
    } else {
        (HealthState::Healthy, format!("Healthy; {}", notes.join("; ")))
    }
}

/// Runs a trivial KVM guest (`hlt` at 0x1000 in real mode) and reports
/// whether it halted. Meant to run in a throw-away child process: on hosts
/// with broken nested virtualisation KVM_RUN can hang.
pub fn kvm_selftest() -> Kvm {
    use kvm_ioctls::{Kvm as KvmDev, VcpuExit};
    if !Path::new("/dev/kvm").exists() {
        return Kvm::Absent;
    }
    let step = |what: &str, e: &dyn std::fmt::Display| Kvm::Unusable(format!("{what}: {e}"));
    let kvm = match KvmDev::new() {
        Ok(k) => k,
        Err(e) => return step("cannot open /dev/kvm", &e),
    };
    let vm = match kvm.create_vm() {
        Ok(vm) => vm,
        Err(e) => return step("KVM_CREATE_VM failed", &e),
    };
    const MEM: usize = 0x1000;
    // SAFETY: an anonymous private mapping with no address hint; the result is
    // checked against MAP_FAILED before use and unmapped below.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Kvm::Unusable("cannot map guest memory".into());
    }
    // SAFETY: `mem` is a fresh writable mapping of MEM bytes; we write one byte.
    unsafe { *(mem as *mut u8) = 0xf4 }; // hlt
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0x1000,
        memory_size: MEM as u64,
        userspace_addr: mem as u64,
        flags: 0,
    };
    let result = (|| {
        // SAFETY: the region points at our live mapping, which outlives the VM
        // (unmapped only after `vm` and the vCPU are dropped inside this closure).
        unsafe { vm.set_user_memory_region(region) }.map_err(|e| step("KVM_SET_USER_MEMORY_REGION failed", &e))?;
        let mut vcpu = vm.create_vcpu(0).map_err(|e| step("KVM_CREATE_VCPU failed", &e))?;
        let mut sregs = vcpu.get_sregs().map_err(|e| step("KVM_GET_SREGS failed", &e))?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).map_err(|e| step("KVM_SET_SREGS failed", &e))?;
        let mut regs = vcpu.get_regs().map_err(|e| step("KVM_GET_REGS failed", &e))?;
        regs.rip = 0x1000;
        regs.rflags = 2;
        vcpu.set_regs(&regs).map_err(|e| step("KVM_SET_REGS failed", &e))?;
        match vcpu.run() {
            Ok(VcpuExit::Hlt) => Ok(Kvm::Usable),
            Ok(other) => Err(Kvm::Unusable(format!("test guest exited with {other:?} instead of halting"))),
            Err(e) => Err(step("KVM_RUN failed", &e)),
        }
    })();
    drop(vm);
    // SAFETY: unmapping the mapping created above; the VM using it is gone.
    unsafe { libc::munmap(mem, MEM) };
    result.unwrap_or_else(|e| e)
}

/// Runs [`kvm_selftest`] in a child (`<self> probe-kvm`), killing it after
/// `timeout`: a guest that never halts is the symptom of broken nesting.
pub fn probe_kvm_in_child(self_exe: &Path, timeout: Duration) -> Kvm {
    if !Path::new("/dev/kvm").exists() {
        return Kvm::Absent;
    }
    let mut child = match std::process::Command::new(self_exe)
        .arg("probe-kvm")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Kvm::Unusable(format!("cannot run the KVM probe: {e}")),
    };
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Kvm::Unusable(format!("a test guest did not halt within {timeout:?}"));
            }
        }
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        use std::io::Read;
        let _ = stdout.read_to_string(&mut out);
    }
    parse_probe_output(&out)
}

/// `probe-kvm` prints one line: `usable`, `absent` or `unusable: <why>`.
pub fn format_probe_output(kvm: &Kvm) -> String {
    match kvm {
        Kvm::Usable => "usable".into(),
        Kvm::Absent => "absent".into(),
        Kvm::Unusable(why) => format!("unusable: {why}"),
    }
}

pub fn parse_probe_output(out: &str) -> Kvm {
    let line = out.trim();
    match line {
        "usable" => Kvm::Usable,
        "absent" => Kvm::Absent,
        _ => Kvm::Unusable(line.strip_prefix("unusable: ").unwrap_or("the KVM probe crashed").to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy_facts() -> HostFacts {
        HostFacts {
            is_root: true,
            kvm: Kvm::Usable,
            tun: true,
            vhost_net: true,
            vhost_vsock: false,
            virtiofsd: Some("/usr/bin/virtiofsd".into()),
            nix: Some("/usr/bin/nix".into()),
            vmm_identity: Ok(()),
            state_dir: Ok(()),
            hypervisors: vec!["qemu"],
            cgroups: "v2",
        }
    }

    fn health(r: &FingerprintResponse) -> HealthState {
        HealthState::try_from(r.health).unwrap()
    }

    fn attr<'a>(r: &'a FingerprintResponse, k: &str) -> &'a AttrValue {
        r.attributes[&format!("driver.microvm.{k}")].value.as_ref().unwrap()
    }

    #[test]
    fn all_good_is_healthy_with_attributes() {
        let r = assess(&healthy_facts(), &PluginConfig::default());
        assert_eq!(health(&r), HealthState::Healthy);
        assert_eq!(r.health_description, "Healthy");
        assert_eq!(attr(&r, "kvm"), &AttrValue::BoolVal(true));
        assert_eq!(attr(&r, "hypervisors"), &AttrValue::StringVal("qemu".into()));
        assert_eq!(attr(&r, "version"), &AttrValue::StringVal(crate::VERSION.into()));
        assert!(r.attributes.keys().all(|k| k.starts_with("driver.microvm.")));
    }

    #[test]
    fn not_root_is_undetected() {
        let r = assess(&HostFacts { is_root: false, ..healthy_facts() }, &PluginConfig::default());
        assert_eq!(health(&r), HealthState::Undetected);
        assert!(r.health_description.contains("must run as root"), "{}", r.health_description);
    }

    #[test]
    fn blockers_are_unhealthy_and_all_listed() {
        let facts = HostFacts {
            tun: false,
            vmm_identity: Err("VMM user \"microvm\" does not exist: create it".into()),
            ..healthy_facts()
        };
        let r = assess(&facts, &PluginConfig::default());
        assert_eq!(health(&r), HealthState::Unhealthy);
        assert!(r.health_description.contains("/dev/net/tun"));
        assert!(r.health_description.contains("VMM user \"microvm\" does not exist"));
    }

    #[test]
    fn degradations_stay_healthy_but_say_so() {
        let r = assess(&HostFacts { kvm: Kvm::Absent, virtiofsd: None, ..healthy_facts() }, &PluginConfig::default());
        assert_eq!(health(&r), HealthState::Healthy);
        assert!(r.health_description.starts_with("Healthy; no /dev/kvm"), "{}", r.health_description);
        assert!(r.health_description.contains("virtiofsd not found"));
        assert_eq!(attr(&r, "kvm"), &AttrValue::BoolVal(false));
        assert_eq!(attr(&r, "virtiofsd"), &AttrValue::BoolVal(false));

        let r = assess(
            &HostFacts { kvm: Kvm::Unusable("a test guest did not halt".into()), ..healthy_facts() },
            &PluginConfig::default(),
        );
        assert!(r.health_description.contains("KVM present but unusable (a test guest did not halt)"));
    }

    #[test]
    fn probe_output_round_trips() {
        for k in [Kvm::Usable, Kvm::Absent, Kvm::Unusable("KVM_RUN failed: EINTR".into())] {
            assert_eq!(parse_probe_output(&format_probe_output(&k)), k);
        }
        assert_eq!(parse_probe_output(""), Kvm::Unusable("the KVM probe crashed".into()));
    }

    #[test]
    fn which_finds_sh() {
        assert!(which(Path::new("sh")).is_some());
        assert!(which(Path::new("/bin/sh")).is_some());
        assert!(which(Path::new("definitely-not-a-binary-xyz")).is_none());
    }
}

//! One microVM: guest memory, the KVM VM with its interrupt controllers, the devices,
//! the boot structures and the vCPU threads, built from a `MachineConfig`.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use seccompiler::BpfProgram;
use vm_memory::GuestMemoryMmap;

use crate::boot::regs::{setup_lapic, setup_msrs, setup_registers, EntryMode};
use tartarus_vmm_api::cmdline::parse_cmdline;

use crate::boot::{cpuid::filter_cpuid, prepare_boot, BootError};
use crate::control::{install_kick_handler, Control, VmExit};
use crate::devices::generation::{GenerationDevice, GenerationState, GENERATION_PAGE_SIZE};
use crate::devices::legacy::{
    ResetHandler, SerialDevice, SerialSnapshot, I8042, I8042_PORT_BASE, I8042_PORT_SIZE,
    SERIAL_IRQ, SERIAL_PORT_BASE, SERIAL_PORT_SIZE,
};
use crate::devices::serial_output::SerialOutput;
use crate::devices::{DeviceError, DeviceManager};
use crate::layout::{ram_ranges, GENERATION_DEVICE_START, KVM_TSS_ADDRESS};
use crate::memory::{create_guest_memory, register_guest_memory, MemoryError};
use crate::metrics::Metrics;
use crate::snapshot::lineage::Lineage;
use crate::vcpu::{SharedVcpu, Vcpu};
use tartarus_vmm_api::config::{ConfigError, MachineConfig};

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("KVM {what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("cannot open the serial output: {0}")]
    Serial(std::io::Error),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("the machine was already started")]
    AlreadyStarted,
    #[error("cannot restore device state: {0}")]
    DeviceState(String),
    #[error("cannot draw random bytes for the generation device: {0}")]
    Random(std::io::Error),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MachineError {
    move |source| MachineError::Kvm { what, source }
}

/// Extra devices (virtio) a caller adds while the machine is being built.
pub type DeviceHook<'a> =
    &'a mut dyn FnMut(&mut DeviceManager, &GuestMemoryMmap) -> Result<(), DeviceError>;

struct ResetToExit(Arc<Control>);

impl ResetHandler for ResetToExit {
    fn reset(&self) {
        self.0.request_exit(VmExit::Reset);
    }
}

pub type SharedSerial = Arc<Mutex<SerialDevice<SerialOutput>>>;

/// Loads saved VM and vCPU state into a restored machine's new VM and vCPUs.
pub type LoadHook<'a> = &'a mut dyn FnMut(&VmFd, &[VcpuFd]) -> Result<(), MachineError>;

/// What a restored machine is built from (besides the state `LoadHook` loads).
pub struct RestoredParts {
    pub config: MachineConfig,
    pub mem: GuestMemoryMmap,
    pub entry: EntryMode,
    pub serial: SerialSnapshot,
    pub generation: GenerationState,
    pub lineage: Lineage,
}

pub struct Machine {
    config: MachineConfig,
    // Field order matters for drop: threads are joined in Drop before memory goes.
    threads: Vec<JoinHandle<()>>,
    vcpus: Vec<SharedVcpu>,
    started: bool,
    devices: Arc<DeviceManager>,
    serial: SharedSerial,
    generation: Arc<Mutex<GenerationDevice>>,
    control: Arc<Control>,
    metrics: Arc<Metrics>,
    entry: EntryMode,
    /// Where guest memory came from and what was written since (for diff snapshots).
    pub lineage: Lineage,
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
}

/// A VM with memory and devices but no vCPUs: what booting and restoring share.
struct Parts {
    vm: Arc<VmFd>,
    control: Arc<Control>,
    devices: DeviceManager,
    serial: SharedSerial,
    generation: Arc<Mutex<GenerationDevice>>,
}

/// Creates the VM around `mem`: interrupt controllers, PIT, memory slots, the serial
/// port (fresh, or in `serial_state`), the i8042, the generation device, then the
/// caller's extra devices.
fn assemble(
    kvm: &Kvm,
    config: &MachineConfig,
    metrics: &Metrics,
    mem: &GuestMemoryMmap,
    serial_state: Option<&SerialSnapshot>,
    generation: GenerationState,
    extra_devices: DeviceHook<'_>,
) -> Result<Parts, MachineError> {
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("create VM"))?);
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(kvm_err("set TSS address"))?;
    vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("create PIT"))?;
    register_guest_memory(&vm, mem, config.track_dirty_pages)?;

    let control = Arc::new(Control::default());
    let mut devices = DeviceManager::new(vm.clone());
    let serial_out = SerialOutput::open(
        &config.serial,
        config.serial_limit_bytes,
        metrics.serial.clone(),
    )
    .map_err(MachineError::Serial)?;
    let irq = devices.irq_eventfd(SERIAL_IRQ)?;
    let serial = match serial_state {
        Some(state) => SerialDevice::from_snapshot(state, irq, serial_out)
            .map_err(MachineError::DeviceState)?,
        None => SerialDevice::new(irq, serial_out),
    };
    let serial = Arc::new(Mutex::new(serial));
    devices.register_pio_device(SERIAL_PORT_BASE, SERIAL_PORT_SIZE, serial.clone())?;
    let i8042 = I8042::new(ResetToExit(control.clone()));
    devices.register_pio_device(
        I8042_PORT_BASE,
        I8042_PORT_SIZE,
        Arc::new(Mutex::new(i8042)),
    )?;
    let generation = Arc::new(Mutex::new(GenerationDevice::new(generation)));
    devices.register_fixed_mmio_device(
        GENERATION_DEVICE_START,
        GENERATION_PAGE_SIZE,
        generation.clone(),
    )?;
    extra_devices(&mut devices, mem)?;
    Ok(Parts {
        vm,
        control,
        devices,
        serial,
        generation,
    })
}

impl Machine {
    /// Builds the VM: memory, interrupt controllers, devices, kernel and boot
    /// structures, configured vCPUs. Nothing runs until `start`.
    pub fn build(
        kvm: &Kvm,
        config: MachineConfig,
        metrics: Arc<Metrics>,
        extra_devices: DeviceHook<'_>,
    ) -> Result<Machine, MachineError> {
        config.validate()?;
        let ranges = ram_ranges(config.memory_bytes());
        let mem = create_guest_memory(&ranges, &config.memory)?;
        let generation = GenerationState::first().map_err(MachineError::Random)?;
        let parts = assemble(
            kvm,
            &config,
            &metrics,
            &mem,
            None,
            generation,
            extra_devices,
        )?;

        let mut cmdline = parse_cmdline(&config.cmdline).map_err(BootError::from)?;
        parts.devices.add_to_cmdline(&mut cmdline)?;
        let boot = prepare_boot(
            &mem,
            &ranges,
            &config.kernel,
            &cmdline,
            config.vcpus,
            config.boot_protocol,
        )?;

        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get supported CPUID"))?;
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for id in 0..config.vcpus {
            let fd = parts
                .vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("create vCPU"))?;
            let mut own = cpuid.clone();
            filter_cpuid(own.as_mut_slice(), config.cpu_template, id, config.vcpus);
            fd.set_cpuid2(&own).map_err(kvm_err("set CPUID"))?;
            setup_msrs(&fd).map_err(BootError::from)?;
            setup_registers(&fd, &boot.entry, id == 0).map_err(BootError::from)?;
            setup_lapic(&fd).map_err(BootError::from)?;
            vcpus.push(Arc::new(Mutex::new(fd)));
        }
        Ok(Machine::from_parts(
            parts,
            config,
            vcpus,
            metrics,
            boot.entry,
            mem,
            Lineage::default(),
        ))
    }

    /// Builds a VM around restored memory with fresh vCPUs and the devices
    /// `extra_devices` adds in their saved state; `load` puts the saved VM and vCPU
    /// state into the vCPUs. Nothing runs until `start`.
    pub fn restore(
        kvm: &Kvm,
        parts: RestoredParts,
        metrics: Arc<Metrics>,
        extra_devices: DeviceHook<'_>,
        load: LoadHook<'_>,
    ) -> Result<Machine, MachineError> {
        let RestoredParts {
            config,
            mem,
            entry,
            serial,
            generation,
            lineage,
        } = parts;
        config.validate()?;
        let parts = assemble(
            kvm,
            &config,
            &metrics,
            &mem,
            Some(&serial),
            generation,
            extra_devices,
        )?;
        let mut fds = Vec::with_capacity(config.vcpus as usize);
        for id in 0..config.vcpus {
            fds.push(
                parts
                    .vm
                    .create_vcpu(u64::from(id))
                    .map_err(kvm_err("create vCPU"))?,
            );
        }
        load(&parts.vm, &fds)?;
        let vcpus = fds.into_iter().map(|fd| Arc::new(Mutex::new(fd))).collect();
        Ok(Machine::from_parts(
            parts, config, vcpus, metrics, entry, mem, lineage,
        ))
    }

    fn from_parts(
        parts: Parts,
        config: MachineConfig,
        vcpus: Vec<SharedVcpu>,
        metrics: Arc<Metrics>,
        entry: EntryMode,
        mem: GuestMemoryMmap,
        lineage: Lineage,
    ) -> Machine {
        Machine {
            config,
            threads: Vec::new(),
            vcpus,
            started: false,
            devices: Arc::new(parts.devices),
            serial: parts.serial,
            generation: parts.generation,
            control: parts.control,
            metrics,
            entry,
            lineage,
            vm: parts.vm,
            mem,
        }
    }

    /// Starts one thread per vCPU (each installing `vcpu_filter` first, if given) and
    /// the wall-clock watchdog.
    pub fn start(&mut self, vcpu_filter: Option<Arc<BpfProgram>>) -> Result<(), MachineError> {
        if self.started {
            return Err(MachineError::AlreadyStarted);
        }
        self.started = true;
        install_kick_handler().map_err(MachineError::Thread)?;
        self.metrics.note_start();
        for (id, fd) in self.vcpus.iter().enumerate() {
            let vcpu = Vcpu {
                id: id as u8,
                fd: fd.clone(),
                devices: self.devices.clone(),
                control: self.control.clone(),
                metrics: self.metrics.clone(),
            };
            let filter = vcpu_filter.clone();
            let control = self.control.clone();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    if let Some(filter) = filter {
                        if let Err(e) = seccompiler::apply_filter(&filter) {
                            control.request_exit(VmExit::RunFailed {
                                vcpu: id as u8,
                                errno: 0,
                                message: format!("cannot install the vCPU seccomp filter: {e}"),
                            });
                            return;
                        }
                    }
                    vcpu.run();
                })
                .map_err(MachineError::Thread)?;
            self.threads.push(handle);
        }
        if let Some(limit_ms) = self.config.wall_clock_limit_ms {
            let control = self.control.clone();
            let deadline = Instant::now() + Duration::from_millis(limit_ms);
            let handle = std::thread::Builder::new()
                .name("watchdog".into())
                .spawn(move || {
                    if control.wait_exit_until(deadline).is_none() {
                        control.request_exit(VmExit::WallClockLimit { limit_ms });
                    }
                })
                .map_err(MachineError::Thread)?;
            self.threads.push(handle);
        }
        Ok(())
    }

    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    pub fn devices(&self) -> &Arc<DeviceManager> {
        &self.devices
    }

    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    pub fn entry(&self) -> EntryMode {
        self.entry
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    pub fn vcpus(&self) -> &[SharedVcpu] {
        &self.vcpus
    }

    pub fn serial(&self) -> &SharedSerial {
        &self.serial
    }

    pub fn generation(&self) -> GenerationState {
        self.generation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .state()
            .clone()
    }

    pub fn started(&self) -> bool {
        self.started
    }

    /// Stops the guest (if it still runs) and waits up to `timeout` for the vCPU threads.
    pub fn stop(&mut self, timeout: Duration) -> bool {
        self.control.request_exit(VmExit::Stopped);
        let stopped = self.control.wait_stopped(Some(timeout));
        if stopped {
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
        stopped
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // vCPU threads run on this memory: they must be gone before it is unmapped.
        if !self.threads.is_empty() {
            self.control.request_exit(VmExit::Stopped);
            self.control.wait_stopped(None);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}

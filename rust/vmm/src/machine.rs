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
use crate::boot::{cmdline::parse_cmdline, cpuid::filter_cpuid, prepare_boot, BootError};
use crate::config::{ConfigError, MachineConfig};
use crate::control::{install_kick_handler, Control, VmExit};
use crate::devices::legacy::{
    ResetHandler, SerialDevice, I8042, I8042_PORT_BASE, I8042_PORT_SIZE, SERIAL_IRQ,
    SERIAL_PORT_BASE, SERIAL_PORT_SIZE,
};
use crate::devices::serial_output::SerialOutput;
use crate::devices::{DeviceError, DeviceManager};
use crate::layout::{ram_ranges, KVM_TSS_ADDRESS};
use crate::memory::{create_guest_memory, register_guest_memory, MemoryError};
use crate::metrics::Metrics;
use crate::vcpu::Vcpu;

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

pub struct Machine {
    config: MachineConfig,
    // Field order matters for drop: threads are joined in Drop before memory goes.
    threads: Vec<JoinHandle<()>>,
    pending_vcpus: Vec<VcpuFd>,
    devices: Arc<DeviceManager>,
    control: Arc<Control>,
    metrics: Arc<Metrics>,
    entry: EntryMode,
    _vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
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
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("create VM"))?);
        vm.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("set TSS address"))?;
        vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("create PIT"))?;
        register_guest_memory(&vm, &mem)?;

        let control = Arc::new(Control::default());
        let mut devices = DeviceManager::new(vm.clone());
        let serial_out = SerialOutput::open(
            &config.serial,
            config.serial_limit_bytes,
            metrics.serial.clone(),
        )
        .map_err(MachineError::Serial)?;
        let serial = SerialDevice::new(devices.irq_eventfd(SERIAL_IRQ)?, serial_out);
        devices.register_pio_device(
            SERIAL_PORT_BASE,
            SERIAL_PORT_SIZE,
            Arc::new(Mutex::new(serial)),
        )?;
        let i8042 = I8042::new(ResetToExit(control.clone()));
        devices.register_pio_device(
            I8042_PORT_BASE,
            I8042_PORT_SIZE,
            Arc::new(Mutex::new(i8042)),
        )?;
        extra_devices(&mut devices, &mem)?;

        let mut cmdline = parse_cmdline(&config.cmdline).map_err(BootError::from)?;
        devices.add_to_cmdline(&mut cmdline)?;
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
        let mut pending_vcpus = Vec::with_capacity(config.vcpus as usize);
        for id in 0..config.vcpus {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("create vCPU"))?;
            let mut own = cpuid.clone();
            filter_cpuid(own.as_mut_slice(), config.cpu_template, id, config.vcpus);
            fd.set_cpuid2(&own).map_err(kvm_err("set CPUID"))?;
            setup_msrs(&fd).map_err(BootError::from)?;
            setup_registers(&fd, &boot.entry, id == 0).map_err(BootError::from)?;
            setup_lapic(&fd).map_err(BootError::from)?;
            pending_vcpus.push(fd);
        }
        Ok(Machine {
            config,
            threads: Vec::new(),
            pending_vcpus,
            devices: Arc::new(devices),
            control,
            metrics,
            entry: boot.entry,
            _vm: vm,
            mem,
        })
    }

    /// Starts one thread per vCPU (each installing `vcpu_filter` first, if given) and
    /// the wall-clock watchdog.
    pub fn start(&mut self, vcpu_filter: Option<Arc<BpfProgram>>) -> Result<(), MachineError> {
        if self.pending_vcpus.is_empty() {
            return Err(MachineError::AlreadyStarted);
        }
        install_kick_handler().map_err(MachineError::Thread)?;
        self.metrics.note_start();
        for (id, fd) in self.pending_vcpus.drain(..).enumerate() {
            let vcpu = Vcpu {
                id: id as u8,
                fd,
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

    pub fn started(&self) -> bool {
        self.pending_vcpus.is_empty()
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

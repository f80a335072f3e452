//! Legacy PC devices every microVM has: the 8250 UART on COM1 (vm-superio) and the
//! i8042 controller, whose only job here is the guest's "reset the CPU" command, the
//! way Linux reboots and the way probe guests end a run.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
pub const SERIAL_PORT_SIZE: u16 = 8;
pub const SERIAL_IRQ: u32 = 4;
/// i8042 data port (0x60) through command port (0x64).
pub const I8042_PORT_BASE: u16 = 0x60;
pub const I8042_PORT_SIZE: u16 = 5;

/// Raises an interrupt (or any event) by writing to an eventfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Something that happens when the guest asks for a CPU reset.
pub trait ResetHandler: Send {
    fn reset(&self);
}

struct ResetTrigger<R: ResetHandler>(R);

impl<R: ResetHandler> Trigger for ResetTrigger<R> {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.reset();
        Ok(())
    }
}

/// The UART's registers and receive FIFO, as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The COM1 UART on the PIO bus.
pub struct SerialDevice<W: Write + Send> {
    serial: Serial<EventFdTrigger, NoEvents, W>,
}

impl<W: Write + Send> SerialDevice<W> {
    pub fn new(interrupt: EventFd, out: W) -> Self {
        SerialDevice {
            serial: Serial::new(EventFdTrigger(interrupt), out),
        }
    }

    /// A UART in a saved state (a restored snapshot); refuses an impossible state.
    pub fn from_snapshot(
        state: &SerialSnapshot,
        interrupt: EventFd,
        out: W,
    ) -> Result<Self, String> {
        Serial::from_state(
            &SerialState::from(state),
            EventFdTrigger(interrupt),
            NoEvents,
            out,
        )
        .map(|serial| SerialDevice { serial })
        .map_err(|e| format!("invalid saved serial state: {e:?}"))
    }

    pub fn snapshot(&self) -> SerialSnapshot {
        self.serial.state().into()
    }
}

impl<W: Write + Send> MutDevicePio for SerialDevice<W> {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        // The UART's registers are bytes; wider accesses read the register then zeros.
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.serial.read(offset);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            // A failed interrupt injection loses only that interrupt; the byte was
            // already written out.
            let _ = self.serial.write(offset, value);
        }
    }
}

/// The i8042 controller on the PIO bus.
pub struct I8042<R: ResetHandler> {
    device: I8042Device<ResetTrigger<R>>,
}

impl<R: ResetHandler> I8042<R> {
    pub fn new(on_reset: R) -> Self {
        I8042 {
            device: I8042Device::new(ResetTrigger(on_reset)),
        }
    }
}

impl<R: ResetHandler> MutDevicePio for I8042<R> {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.device.read(offset);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset)) {
            let _ = self.device.write(offset, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    struct Flag(Arc<AtomicBool>);
    impl ResetHandler for Flag {
        fn reset(&self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn i8042_reset_command_calls_the_handler() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut dev = I8042::new(Flag(flag.clone()));
        dev.pio_write(PioAddress(I8042_PORT_BASE), 0, &[0xfe]);
        assert!(
            !flag.load(Ordering::SeqCst),
            "a data-port write is not a reset"
        );
        dev.pio_write(PioAddress(I8042_PORT_BASE), 4, &[0xfe]);
        assert!(flag.load(Ordering::SeqCst));
    }

    #[test]
    fn serial_state_survives_a_round_trip_and_a_full_fifo_is_refused() {
        let mut dev = SerialDevice::new(EventFd::new(0).unwrap(), Vec::new());
        dev.pio_write(PioAddress(SERIAL_PORT_BASE), 7, &[0x5a]);
        dev.pio_write(PioAddress(SERIAL_PORT_BASE), 1, &[0x02]);
        let saved = dev.snapshot();
        let back =
            SerialDevice::from_snapshot(&saved, EventFd::new(0).unwrap(), Vec::new()).unwrap();
        assert_eq!(back.snapshot(), saved);
        let bad = SerialSnapshot {
            in_buffer: vec![0; 1 << 16],
            ..saved
        };
        assert!(SerialDevice::from_snapshot(&bad, EventFd::new(0).unwrap(), Vec::new()).is_err());
    }

    #[test]
    fn serial_writes_reach_the_sink_and_odd_accesses_are_harmless() {
        let evt = EventFd::new(0).unwrap();
        let mut dev = SerialDevice::new(evt, Vec::new());
        for b in b"ok" {
            dev.pio_write(PioAddress(SERIAL_PORT_BASE), 0, &[*b]);
        }
        dev.pio_write(PioAddress(SERIAL_PORT_BASE), 0, &[]);
        dev.pio_write(PioAddress(SERIAL_PORT_BASE), 0x1000, &[1]);
        let mut wide = [0xaau8; 4];
        dev.pio_read(PioAddress(SERIAL_PORT_BASE), 5, &mut wide);
        assert_eq!(&wide[1..], &[0, 0, 0]);
        assert_eq!(dev.serial.writer(), b"ok");
    }
}

//! virtio-blk driven through the MMIO registers and rings, including hostile drivers.

use std::io::Write;
use std::time::Duration;

use proptest::prelude::*;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::mmio::reg;
use crate::devices::virtio::test_driver::{Desc, Driver, DATA};
use crate::devices::virtio::worker::DeviceWorker;

const V1: u64 = 1 << VIRTIO_F_VERSION_1;
const HDR: u64 = DATA;
const BUF: u64 = DATA + 0x1000;
const STATUS: u64 = DATA + 0x10_0000;
const DISK_SECTORS: u64 = 2048;

fn disk_file() -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let data: Vec<u8> = (0..DISK_SECTORS * 512).map(|i| (i % 251) as u8).collect();
    f.write_all(&data).unwrap();
    f
}

fn block(path: &Path, read_only: bool, rate_limit: RateLimit) -> Block {
    Block::open(BlockConfig {
        path: path.to_path_buf(),
        read_only,
        id: "tartarus-root".into(),
        rate_limit,
    })
    .unwrap()
}

fn ready_driver(read_only: bool) -> (Driver<Block>, tempfile::NamedTempFile) {
    let file = disk_file();
    let mut d = Driver::new(block(file.path(), read_only, RateLimit::default()));
    let status = d.init(V1, &[QUEUE_SIZE]);
    assert_eq!(
        status & VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_DRIVER_OK
    );
    (d, file)
}

fn header(d: &Driver<Block>, kind: u32, sector: u64) {
    d.mem.write_obj(kind, GuestAddress(HDR)).unwrap();
    d.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    d.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
}

fn status(d: &Driver<Block>) -> u32 {
    u32::from(d.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
}

/// Submits one request and returns (used len, status byte).
fn submit(d: &mut Driver<Block>, descs: &[Desc]) -> (u32, u32) {
    d.add_chain(0, descs);
    d.notify(0);
    let (_, len) = d.pop_used(0).expect("request completed");
    (len, status(d))
}

fn read_req(d: &mut Driver<Block>, sector: u64, len: u32) -> (u32, u32) {
    header(d, VIRTIO_BLK_T_IN, sector);
    submit(
        d,
        &[Desc::r(HDR, 16), Desc::w(BUF, len), Desc::w(STATUS, 1)],
    )
}

fn expected(sector: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((sector * 512 + i) % 251) as u8)
        .collect()
}

#[test]
fn features_and_config_describe_the_disk() {
    let (d, _f) = ready_driver(true);
    let features = d.device_features();
    assert_ne!(features & V1, 0);
    assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(features & (1 << VIRTIO_BLK_F_FLUSH), 0);
    let capacity = u64::from_le_bytes(d.read_config(0, 8).try_into().unwrap());
    assert_eq!(capacity, DISK_SECTORS);
    assert_eq!(d.read(reg::DEVICE_ID), 2);
    // Sub-word register reads return nothing; config reads of any width work.
    assert_eq!(d.read_config(0, 2), vec![0, 8]);
}

#[test]
fn driver_without_version_1_is_refused() {
    let file = disk_file();
    let mut d = Driver::new(block(file.path(), true, RateLimit::default()));
    let status = d.init(0, &[QUEUE_SIZE]);
    assert_eq!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0);
}

#[test]
fn driver_acking_unknown_features_is_refused() {
    let file = disk_file();
    let mut d = Driver::new(block(file.path(), true, RateLimit::default()));
    let status = d.init(V1 | (1 << 40), &[QUEUE_SIZE]);
    assert_eq!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0);
}

#[test]
fn reads_return_the_disk_contents() {
    let (mut d, _f) = ready_driver(true);
    let (len, st) = read_req(&mut d, 7, 4096);
    assert_eq!((len, st), (4097, VIRTIO_BLK_S_OK));
    let mut got = vec![0u8; 4096];
    d.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_eq!(got, expected(7, 4096));
}

#[test]
fn data_split_across_many_descriptors_is_gathered() {
    let (mut d, _f) = ready_driver(true);
    header(&d, VIRTIO_BLK_T_IN, 1);
    let mut descs = vec![Desc::r(HDR, 8), Desc::r(HDR + 8, 8)];
    for i in 0..8 {
        descs.push(Desc::w(BUF + i * 0x2000, 128));
    }
    descs.push(Desc::w(STATUS, 1));
    let (len, st) = submit(&mut d, &descs);
    assert_eq!((len, st), (1025, VIRTIO_BLK_S_OK));
    let want = expected(1, 1024);
    for i in 0..8u64 {
        let mut got = vec![0u8; 128];
        d.mem
            .read_slice(&mut got, GuestAddress(BUF + i * 0x2000))
            .unwrap();
        assert_eq!(got, want[(i * 128) as usize..((i + 1) * 128) as usize]);
    }
}

#[test]
fn writes_reach_the_scratch_disk_and_read_back() {
    let (mut d, f) = ready_driver(false);
    d.mem.write_slice(&[0xab; 1024], GuestAddress(BUF)).unwrap();
    header(&d, VIRTIO_BLK_T_OUT, 100);
    let (len, st) = submit(
        &mut d,
        &[Desc::r(HDR, 16), Desc::r(BUF, 1024), Desc::w(STATUS, 1)],
    );
    assert_eq!((len, st), (1, VIRTIO_BLK_S_OK));
    header(&d, VIRTIO_BLK_T_FLUSH, 0);
    let (_, st) = submit(&mut d, &[Desc::r(HDR, 16), Desc::w(STATUS, 1)]);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    let on_disk = std::fs::read(f.path()).unwrap();
    assert_eq!(&on_disk[100 * 512..100 * 512 + 1024], &[0xab; 1024]);
    d.mem.write_slice(&[0; 1024], GuestAddress(BUF)).unwrap();
    let (_, st) = read_req(&mut d, 100, 1024);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    let mut got = vec![0u8; 1024];
    d.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_eq!(got, vec![0xab; 1024]);
    assert_eq!(
        d.transport.lock().unwrap().device().stats().write_bytes,
        1024
    );
}

#[test]
fn writes_to_a_read_only_disk_fail_and_change_nothing() {
    let (mut d, f) = ready_driver(true);
    let before = std::fs::read(f.path()).unwrap();
    d.mem.write_slice(&[0xcd; 512], GuestAddress(BUF)).unwrap();
    header(&d, VIRTIO_BLK_T_OUT, 0);
    let (len, st) = submit(
        &mut d,
        &[Desc::r(HDR, 16), Desc::r(BUF, 512), Desc::w(STATUS, 1)],
    );
    assert_eq!((len, st), (1, VIRTIO_BLK_S_IOERR));
    assert_eq!(std::fs::read(f.path()).unwrap(), before);
}

#[test]
fn out_of_range_and_overflowing_sectors_fail() {
    let (mut d, _f) = ready_driver(true);
    for sector in [DISK_SECTORS, DISK_SECTORS - 1, u64::MAX, u64::MAX / 512] {
        let (_, st) = read_req(&mut d, sector, 1024);
        assert_eq!(st, VIRTIO_BLK_S_IOERR, "sector {sector}");
    }
    // The last whole sector is fine.
    let (_, st) = read_req(&mut d, DISK_SECTORS - 1, 512);
    assert_eq!(st, VIRTIO_BLK_S_OK);
}

#[test]
fn partial_sectors_and_wrong_directions_fail() {
    let (mut d, _f) = ready_driver(false);
    let (_, st) = read_req(&mut d, 0, 100);
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    // A read whose data buffer is device-readable.
    header(&d, VIRTIO_BLK_T_IN, 0);
    let (_, st) = submit(
        &mut d,
        &[Desc::r(HDR, 16), Desc::r(BUF, 512), Desc::w(STATUS, 1)],
    );
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    // A write whose data buffer is device-writable.
    header(&d, VIRTIO_BLK_T_OUT, 0);
    let (_, st) = submit(
        &mut d,
        &[Desc::r(HDR, 16), Desc::w(BUF, 512), Desc::w(STATUS, 1)],
    );
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    // A header shorter than 16 bytes.
    let (len, st) = submit(&mut d, &[Desc::r(HDR, 8), Desc::w(STATUS, 1)]);
    assert_eq!((len, st), (1, VIRTIO_BLK_S_IOERR));
}

#[test]
fn unknown_request_types_are_unsupported_and_get_id_works() {
    let (mut d, _f) = ready_driver(true);
    header(&d, 0x1234, 0);
    let (_, st) = submit(&mut d, &[Desc::r(HDR, 16), Desc::w(STATUS, 1)]);
    assert_eq!(st, VIRTIO_BLK_S_UNSUPP);
    header(&d, VIRTIO_BLK_T_GET_ID, 0);
    let (len, st) = submit(
        &mut d,
        &[Desc::r(HDR, 16), Desc::w(BUF, 20), Desc::w(STATUS, 1)],
    );
    assert_eq!((len, st), (21, VIRTIO_BLK_S_OK));
    let mut id = [0u8; 13];
    d.mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
    assert_eq!(&id, b"tartarus-root");
}

#[test]
fn a_chain_with_no_status_byte_is_returned_untouched() {
    let (mut d, _f) = ready_driver(true);
    header(&d, VIRTIO_BLK_T_IN, 0);
    let (len, st) = submit(&mut d, &[Desc::r(HDR, 16)]);
    assert_eq!((len, st), (0, 0xff));
}

#[test]
fn looping_chains_are_refused_and_the_device_keeps_working() {
    let (mut d, _f) = ready_driver(true);
    header(&d, VIRTIO_BLK_T_IN, 0);
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;
    d.write_desc(0, 10, HDR, 16, next, 11);
    d.write_desc(0, 11, BUF, 512, next | write, 10);
    d.push_avail(0, 10);
    d.notify(0);
    assert_eq!(d.pop_used(0), Some((10, 0)));
    assert_eq!(status(&d), 0xff);
    // A `next` index beyond the table.
    d.write_desc(0, 12, HDR, 16, next, 5000);
    d.push_avail(0, 12);
    d.notify(0);
    assert_eq!(d.pop_used(0), Some((12, 0)));
    let (_, st) = read_req(&mut d, 0, 512);
    assert_eq!(st, VIRTIO_BLK_S_OK);
}

#[test]
fn buffers_outside_guest_memory_are_refused() {
    let (mut d, _f) = ready_driver(true);
    header(&d, VIRTIO_BLK_T_IN, 0);
    let beyond = (crate::devices::virtio::test_driver::MEM_SIZE as u64) - 256;
    let (len, st) = submit(
        &mut d,
        &[Desc::r(HDR, 16), Desc::w(beyond, 512), Desc::w(STATUS, 1)],
    );
    assert_eq!((len, st), (0, 0xff));
    let (len, _) = submit(&mut d, &[Desc::r(u64::MAX - 4, 16), Desc::w(STATUS, 1)]);
    assert_eq!(len, 0);
}

#[test]
fn readable_after_writable_is_refused() {
    let (mut d, _f) = ready_driver(true);
    header(&d, VIRTIO_BLK_T_IN, 0);
    let (len, _) = submit(
        &mut d,
        &[Desc::w(BUF, 512), Desc::r(HDR, 16), Desc::w(STATUS, 1)],
    );
    assert_eq!(len, 0);
}

#[test]
fn a_bogus_avail_index_does_not_run_away() {
    let (d, _f) = ready_driver(true);
    // The driver claims 40000 new buffers in a 256-entry ring.
    let avail = d.queues[0].avail;
    d.mem.write_obj(40000u16, GuestAddress(avail + 2)).unwrap();
    d.notify(0);
    assert_eq!(d.used_idx(0), 0);
}

#[test]
fn queue_registers_are_frozen_after_driver_ok() {
    let (mut d, _f) = ready_driver(true);
    d.write(reg::QUEUE_SEL, 0);
    d.write(reg::QUEUE_DESC_LOW, 0xdead_0000);
    d.write(reg::QUEUE_NUM, 2);
    let (_, st) = read_req(&mut d, 0, 512);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    // Status bits cannot be taken away except by a reset.
    d.write(reg::STATUS, VIRTIO_CONFIG_S_FEATURES_OK);
    assert_ne!(d.read(reg::STATUS) & VIRTIO_CONFIG_S_DRIVER_OK, 0);
}

#[test]
fn notifications_before_driver_ok_are_ignored() {
    let file = disk_file();
    let d = Driver::new(block(file.path(), true, RateLimit::default()));
    d.write(reg::QUEUE_NOTIFY, 0);
    d.write(reg::QUEUE_NOTIFY, 7);
    assert_eq!(d.read(reg::STATUS), 0);
}

#[test]
fn invalid_rings_at_driver_ok_set_needs_reset() {
    let file = disk_file();
    let d = Driver::new(block(file.path(), true, RateLimit::default()));
    d.write(reg::STATUS, 1);
    d.write(reg::STATUS, 3);
    d.write(reg::DRIVER_FEATURES_SEL, 1);
    d.write(reg::DRIVER_FEATURES, 1);
    d.write(reg::STATUS, 11);
    d.write(reg::QUEUE_SEL, 0);
    d.write(reg::QUEUE_NUM, 256);
    // Descriptor table beyond guest memory.
    d.write(reg::QUEUE_DESC_HIGH, 0x10);
    d.write(reg::QUEUE_DRIVER_LOW, 0x1000);
    d.write(reg::QUEUE_DEVICE_LOW, 0x2000);
    d.write(reg::QUEUE_READY, 1);
    d.write(reg::STATUS, 15);
    assert_ne!(d.read(reg::STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    // A reset brings it back.
    d.write(reg::STATUS, 0);
    assert_eq!(d.read(reg::STATUS), 0);
}

#[test]
fn rate_limited_requests_are_deferred_then_served_by_the_worker() {
    let file = disk_file();
    let limit = RateLimit {
        ops_per_sec: Some(20),
        ..RateLimit::default()
    };
    let mut d = Driver::new(block(file.path(), true, limit));
    d.init(V1, &[QUEUE_SIZE]);
    let _worker = DeviceWorker::spawn("blk-test", d.transport.clone()).unwrap();
    // Each request gets its own buffers so they can be in flight together.
    for i in 0..25u64 {
        let hdr = DATA + 0x20_0000 + i * 0x100;
        d.mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(hdr)).unwrap();
        d.mem.write_obj(i, GuestAddress(hdr + 8)).unwrap();
        d.add_chain(
            0,
            &[
                Desc::r(hdr, 16),
                Desc::w(BUF + i * 0x1000, 512),
                Desc::w(hdr + 0x80, 1),
            ],
        );
    }
    d.notify(0);
    // The bucket holds 20 operations: the rest wait for a refill.
    for _ in 0..20 {
        assert!(d.wait_used(0, Duration::from_secs(10)).is_some());
    }
    assert!(d.transport.lock().unwrap().device().stats().throttled >= 1);
    for _ in 20..25 {
        assert!(d.wait_used(0, Duration::from_secs(10)).is_some());
    }
    assert_eq!(d.used_idx(0), 25);
}

#[test]
fn state_round_trips_through_serde_and_checks_the_disk() {
    let (mut d, _f) = ready_driver(true);
    read_req(&mut d, 0, 512);
    let saved = d.transport.lock().unwrap().save();
    let json = serde_json::to_string(&saved).unwrap();
    let back: crate::devices::virtio::mmio::TransportState<BlockState> =
        serde_json::from_str(&json).unwrap();
    assert_eq!(back, saved);
    assert_eq!(back.queues[0].next_used, 1);

    let other = disk_file();
    let d2 = Driver::new(block(other.path(), true, RateLimit::default()));
    d2.transport.lock().unwrap().restore(back.clone()).unwrap();
    assert_eq!(d2.read(reg::STATUS), saved.status);

    let mut small = tempfile::NamedTempFile::new().unwrap();
    small.write_all(&[0u8; 4096]).unwrap();
    let d3 = Driver::new(block(small.path(), true, RateLimit::default()));
    assert!(d3.transport.lock().unwrap().restore(back).is_err());
}

#[test]
fn empty_disk_images_are_refused() {
    let f = tempfile::NamedTempFile::new().unwrap();
    let err = Block::open(BlockConfig {
        path: f.path().to_path_buf(),
        read_only: true,
        id: String::new(),
        rate_limit: RateLimit::default(),
    })
    .err()
    .unwrap();
    assert!(matches!(err, BlockOpenError::Empty(_)));
}

/// A descriptor a hostile driver might write: address in the data area or wild.
fn any_desc() -> impl Strategy<Value = (u64, u32, u16, u16)> {
    let addr = prop_oneof![
        4 => (0u64..0x10_0000).prop_map(|o| DATA + o),
        1 => any::<u64>(),
    ];
    let len = prop_oneof![4 => 0u32..0x3000, 1 => any::<u32>()];
    let flags = 0u16..8;
    let next = prop_oneof![4 => 0u16..16, 1 => any::<u16>()];
    (addr, len, flags, next)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the descriptor table holds, the device neither panics nor writes outside
    /// buffers the driver marked device-writable, and it keeps serving good requests.
    #[test]
    fn hostile_descriptor_tables_are_contained(
        descs in proptest::collection::vec(any_desc(), 16),
        heads in proptest::collection::vec(0u16..20, 1..12),
        headers in proptest::collection::vec((0u32..10, any::<u64>()), 16),
    ) {
        let (mut d, f) = ready_driver(true);
        let before = std::fs::read(f.path()).unwrap();
        for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
            d.write_desc(0, i as u16, *addr, *len, *flags, *next);
        }
        for (i, (kind, sector)) in headers.iter().enumerate() {
            let at = DATA + i as u64 * 0x1000;
            d.mem.write_obj(*kind, GuestAddress(at)).unwrap();
            d.mem.write_obj(*sector % (DISK_SECTORS + 4), GuestAddress(at + 8)).unwrap();
        }
        let canary = DATA + 0x20_0000;
        d.mem.write_slice(&[0x5a; 4096], GuestAddress(canary)).unwrap();
        for h in &heads {
            d.push_avail(0, *h);
        }
        d.notify(0);
        let mut used = 0;
        while let Some((id, len)) = d.pop_used(0) {
            used += 1;
            prop_assert!(u64::from(id) < 256);
            prop_assert!(u64::from(len) <= request::MAX_REQUEST_BYTES + 1);
        }
        prop_assert!(used <= heads.len());
        let covers_canary = descs.iter().any(|(addr, len, flags, _)| {
            flags & VRING_DESC_F_WRITE as u16 != 0
                && *addr < canary + 4096
                && addr.saturating_add(u64::from(*len)) > canary
        });
        if !covers_canary {
            let mut c = vec![0u8; 4096];
            d.mem.read_slice(&mut c, GuestAddress(canary)).unwrap();
            prop_assert_eq!(c, vec![0x5a; 4096]);
        }
        prop_assert_eq!(std::fs::read(f.path()).unwrap(), before);
        // Whatever happened, a well-formed request still works (unless the device
        // asked for a reset, which is also a valid answer to a hostile driver).
        if d.read(reg::STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET == 0 {
            d.queues[0].used_seen = d.used_idx(0);
            header(&d, VIRTIO_BLK_T_IN, 3);
            d.add_chain(0, &[Desc::r(HDR, 16), Desc::w(BUF, 512), Desc::w(STATUS, 1)]);
            d.notify(0);
            // The hostile heads may still be pending in the ring ahead of ours.
            let mut ok = false;
            while let Some((_, len)) = d.pop_used(0) {
                ok |= len == 513 && status(&d) == VIRTIO_BLK_S_OK;
            }
            prop_assert!(ok);
        }
    }
}

//! NVMe controller registers, queue entries and PRP lists (NVMe base specification 1.4,
//! sections 3.1 and 4): pure encoding and decoding, no I/O, so it is tested on any machine.

/// Controller Capabilities (u64).
pub const CAP: usize = 0x00;
/// Version (u32).
pub const VS: usize = 0x08;
/// Interrupt Mask Set (u32).
pub const INTMS: usize = 0x0C;
/// Controller Configuration (u32).
pub const CC: usize = 0x14;
/// Controller Status (u32).
pub const CSTS: usize = 0x1C;
/// Admin Queue Attributes (u32).
pub const AQA: usize = 0x24;
/// Admin Submission Queue base address (u64).
pub const ASQ: usize = 0x28;
/// Admin Completion Queue base address (u64).
pub const ACQ: usize = 0x30;
/// First doorbell.
pub const DOORBELLS: usize = 0x1000;

/// Bytes of a submission queue entry.
pub const SQE_BYTES: usize = 64;
/// Bytes of a completion queue entry.
pub const CQE_BYTES: usize = 16;
/// The memory page size this driver configures (CC.MPS = 0).
pub const PAGE_BYTES: usize = 4096;

/// The fields of CAP this driver uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Maximum entries of one queue (MQES + 1).
    pub max_queue_entries: u32,
    /// Queues must be physically contiguous (CQR).
    pub contiguous_queues: bool,
    /// Worst-case time for CSTS.RDY to follow CC.EN, in milliseconds (TO is in 500 ms units).
    pub ready_timeout_ms: u64,
    /// Bytes between doorbells (4 << DSTRD).
    pub doorbell_stride: usize,
    /// The NVM command set is supported (CSS bit 0).
    pub nvm_command_set: bool,
    /// Smallest memory page size, bytes (2^(12 + MPSMIN)).
    pub min_page_bytes: usize,
    /// Largest memory page size, bytes.
    pub max_page_bytes: usize,
}

impl Capabilities {
    /// Decodes CAP.
    pub fn decode(cap: u64) -> Capabilities {
        Capabilities {
            max_queue_entries: (cap & 0xFFFF) as u32 + 1,
            contiguous_queues: cap & (1 << 16) != 0,
            ready_timeout_ms: ((cap >> 24) & 0xFF) * 500,
            doorbell_stride: 4 << ((cap >> 32) & 0xF),
            nvm_command_set: (cap >> 37) & 1 != 0,
            min_page_bytes: 1 << (12 + ((cap >> 48) & 0xF)),
            max_page_bytes: 1 << (12 + ((cap >> 52) & 0xF)),
        }
    }

    /// Offset of queue `qid`'s submission tail doorbell.
    pub fn sq_tail_doorbell(&self, qid: u16) -> usize {
        DOORBELLS + (2 * usize::from(qid)) * self.doorbell_stride
    }

    /// Offset of queue `qid`'s completion head doorbell.
    pub fn cq_head_doorbell(&self, qid: u16) -> usize {
        DOORBELLS + (2 * usize::from(qid) + 1) * self.doorbell_stride
    }
}

/// CC value enabling the controller: NVM command set, 4 KiB pages, round robin, 64-byte
/// submission and 16-byte completion entries.
pub const CC_ENABLE: u32 = 1 | (6 << 16) | (4 << 20);
/// The CC.SHN field.
pub const CC_SHN_MASK: u32 = 3 << 14;
/// CC.SHN = normal shutdown.
pub const CC_SHN_NORMAL: u32 = 1 << 14;
/// CSTS.RDY.
pub const CSTS_READY: u32 = 1;
/// CSTS.CFS: controller fatal status.
pub const CSTS_FATAL: u32 = 1 << 1;
/// CSTS.SHST = shutdown processing complete.
pub const CSTS_SHUTDOWN_DONE: u32 = 2 << 2;
/// The CSTS.SHST field.
pub const CSTS_SHST_MASK: u32 = 3 << 2;

/// AQA for admin queues of `entries` each.
pub fn aqa(entries: u32) -> u32 {
    assert!(
        (2..=4096).contains(&entries),
        "admin queues hold 2 to 4096 entries"
    );
    (entries - 1) | ((entries - 1) << 16)
}

/// Admin command opcodes.
pub mod admin {
    /// Delete I/O Submission Queue.
    pub const DELETE_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_SQ: u8 = 0x01;
    /// Delete I/O Completion Queue.
    pub const DELETE_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Feature id: Number of Queues.
    pub const FEATURE_NUM_QUEUES: u32 = 0x07;
    /// Identify CNS: namespace.
    pub const CNS_NAMESPACE: u32 = 0x00;
    /// Identify CNS: controller.
    pub const CNS_CONTROLLER: u32 = 0x01;
}

/// NVM command set opcodes.
pub mod nvm {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DSM: u8 = 0x09;
    /// DSM attribute: deallocate.
    pub const DSM_DEALLOCATE: u32 = 1 << 2;
}

/// A submission queue entry (16 little-endian dwords).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sqe(pub [u32; 16]);

impl Sqe {
    /// An entry with `opcode`, command id `cid` and namespace `nsid`; data pointer by PRPs.
    pub fn new(opcode: u8, cid: u16, nsid: u32) -> Sqe {
        let mut d = [0u32; 16];
        d[0] = u32::from(opcode) | (u32::from(cid) << 16);
        d[1] = nsid;
        Sqe(d)
    }

    /// Sets the data pointer (PRP entry 1 and 2).
    pub fn prps(mut self, prp1: u64, prp2: u64) -> Sqe {
        self.0[6] = prp1 as u32;
        self.0[7] = (prp1 >> 32) as u32;
        self.0[8] = prp2 as u32;
        self.0[9] = (prp2 >> 32) as u32;
        self
    }

    /// Sets the data pointer to one SGL Data Block descriptor (PSDT = 01b): `len` bytes at
    /// `addr`, contiguous in the bus address space (which every buffer of ours is).
    ///
    /// ```text
    /// DPTR (SQE bytes 24..39): 0 u64 address | 8 u32 length | 12 3 bytes reserved |
    ///                          15 u8 descriptor type 0 (data block) << 4 | subtype 0 (address)
    /// ```
    pub fn sgl(mut self, addr: u64, len: u32) -> Sqe {
        self.0[0] = (self.0[0] & !(3 << 14)) | (1 << 14);
        self.0[6] = addr as u32;
        self.0[7] = (addr >> 32) as u32;
        self.0[8] = len;
        self.0[9] = 0;
        self
    }

    /// Sets command dword `n` (10 to 15).
    pub fn cdw(mut self, n: usize, v: u32) -> Sqe {
        assert!((10..=15).contains(&n), "command dwords are 10 to 15");
        self.0[n] = v;
        self
    }

    /// The command id.
    pub fn cid(&self) -> u16 {
        (self.0[0] >> 16) as u16
    }

    /// A read or write of `nlb` blocks at `slba`.
    pub fn rw(opcode: u8, cid: u16, nsid: u32, slba: u64, nlb: u32) -> Sqe {
        assert!(
            (1..=1 << 16).contains(&nlb),
            "1 to 65536 blocks per command"
        );
        Sqe::new(opcode, cid, nsid)
            .cdw(10, slba as u32)
            .cdw(11, (slba >> 32) as u32)
            .cdw(12, nlb - 1)
    }

    /// Little-endian bytes as the controller reads them.
    pub fn to_bytes(&self) -> [u8; SQE_BYTES] {
        let mut b = [0u8; SQE_BYTES];
        for (i, d) in self.0.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&d.to_le_bytes());
        }
        b
    }
}

/// A completion queue entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cqe {
    /// Command-specific result (dword 0).
    pub result: u32,
    /// Where the controller's submission queue head is now.
    pub sq_head: u16,
    /// Which submission queue the command came from.
    pub sq_id: u16,
    /// The command's id.
    pub cid: u16,
    /// Phase tag: flips each time the controller wraps the queue.
    pub phase: bool,
    /// Status field (SC in bits 0-7, SCT in 8-10, CRD 11-12, More 13, DNR 14); 0 is success.
    pub status: u16,
}

impl Cqe {
    /// Decodes the four dwords of an entry.
    pub fn decode(d: [u32; 4]) -> Cqe {
        Cqe {
            result: d[0],
            sq_head: d[2] as u16,
            sq_id: (d[2] >> 16) as u16,
            cid: d[3] as u16,
            phase: d[3] & (1 << 16) != 0,
            status: (d[3] >> 17) as u16,
        }
    }

    /// Status code type and status code (generic, command specific, media errors...).
    pub fn status_parts(&self) -> (u8, u8) {
        (((self.status >> 8) & 0x7) as u8, (self.status & 0xFF) as u8)
    }

    /// Whether the command succeeded.
    pub fn ok(&self) -> bool {
        self.status & 0x7FF == 0
    }

    /// Do Not Retry: the same command would fail again.
    pub fn do_not_retry(&self) -> bool {
        self.status & (1 << 14) != 0
    }
}

/// How a transfer's data pointer is expressed with PRPs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrpPlan {
    /// PRP entry 1: the first byte's address (may be inside a page).
    pub prp1: u64,
    /// PRP entry 2: the second page, the address of a PRP list, or 0.
    pub prp2: u64,
    /// The PRP list to place at `prp2` (empty when PRP2 is a page or unused): the addresses of
    /// the transfer's pages after the first. One list page holds 512 entries; longer lists
    /// chain (see [`prp_list_pages`]).
    pub list: Vec<u64>,
}

/// The PRPs of a transfer of `len` bytes at bus address `iova` in pages of `PAGE_BYTES`,
/// given where its PRP list would go (`list_iova`, page aligned). Only the first entry may
/// have an offset; the buffer must be contiguous in the bus address space.
pub fn prp_plan(iova: u64, len: usize, list_iova: u64) -> PrpPlan {
    assert!(len > 0, "a transfer moves at least one byte");
    assert!(iova.is_multiple_of(4), "PRP entries are dword aligned");
    assert_eq!(
        list_iova % PAGE_BYTES as u64,
        0,
        "a PRP list starts on a page"
    );
    let page = PAGE_BYTES as u64;
    let first_page = iova & !(page - 1);
    let last_page = (iova + len as u64 - 1) & !(page - 1);
    let pages = (last_page - first_page) / page + 1;
    match pages {
        1 => PrpPlan {
            prp1: iova,
            prp2: 0,
            list: Vec::new(),
        },
        2 => PrpPlan {
            prp1: iova,
            prp2: first_page + page,
            list: Vec::new(),
        },
        n => PrpPlan {
            prp1: iova,
            prp2: list_iova,
            list: (1..n).map(|i| first_page + i * page).collect(),
        },
    }
}

/// The list pages of `entries` PRP list entries starting at `list_iova`: each page holds 511
/// entries and a pointer to the next page, except the last, which holds up to 512. Returns the
/// content of each page in order.
pub fn prp_list_pages(entries: &[u64], list_iova: u64) -> Vec<Vec<u64>> {
    let per_page = PAGE_BYTES / 8;
    let mut pages = Vec::new();
    let mut rest = entries;
    let mut next = list_iova;
    while !rest.is_empty() {
        next += PAGE_BYTES as u64;
        if rest.len() <= per_page {
            pages.push(rest.to_vec());
            rest = &[];
        } else {
            let mut p = rest[..per_page - 1].to_vec();
            p.push(next);
            pages.push(p);
            rest = &rest[per_page - 1..];
        }
    }
    pages
}

/// What Identify Controller says that the driver uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerId {
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Firmware revision.
    pub firmware: String,
    /// Largest transfer in units of the minimum page size as a power of two (0: no limit).
    pub mdts: u8,
    /// Number of namespaces.
    pub namespaces: u32,
    /// Optional NVM commands (bit 2 DSM, bit 3 Write Zeroes).
    pub oncs: u16,
    /// A volatile write cache is present (flush needed for durability).
    pub volatile_write_cache: bool,
    /// SGL support (0: none).
    pub sgls: u32,
}

fn text(b: &[u8]) -> String {
    // Space padded by the spec; some controllers pad with NULs.
    String::from_utf8_lossy(b)
        .trim_matches(|c: char| c == ' ' || c == '\0')
        .to_string()
}

impl ControllerId {
    /// Decodes the 4096-byte Identify Controller data structure.
    pub fn decode(b: &[u8]) -> Option<ControllerId> {
        if b.len() < 4096 {
            return None;
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        Some(ControllerId {
            serial: text(&b[4..24]),
            model: text(&b[24..64]),
            firmware: text(&b[64..72]),
            mdts: b[77],
            namespaces: u32_at(516),
            oncs: u16_at(520),
            volatile_write_cache: b[525] & 1 != 0,
            sgls: u32_at(536),
        })
    }

    /// Largest transfer in bytes (`min_page_bytes` from CAP), capped at `cap`.
    pub fn max_transfer_bytes(&self, min_page_bytes: usize, cap: usize) -> usize {
        if self.mdts == 0 || self.mdts >= 32 {
            return cap;
        }
        (min_page_bytes << self.mdts).min(cap)
    }

    /// Write Zeroes is supported.
    pub fn write_zeroes(&self) -> bool {
        self.oncs & (1 << 3) != 0
    }

    /// SGLs are supported for the NVM command set (SGLS bits 1:0; 10b also wants dword
    /// aligned descriptors and lengths, which ours are).
    pub fn sgl_supported(&self) -> bool {
        self.sgls & 0x3 != 0
    }

    /// Dataset Management (deallocate) is supported.
    pub fn dataset_management(&self) -> bool {
        self.oncs & (1 << 2) != 0
    }
}

/// What Identify Namespace says that the driver uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NamespaceId {
    /// Size in logical blocks.
    pub blocks: u64,
    /// Bytes per logical block of the format in use.
    pub lba_bytes: u32,
    /// Metadata bytes per block of that format (this driver needs 0).
    pub metadata_bytes: u16,
}

impl NamespaceId {
    /// Decodes the 4096-byte Identify Namespace data structure.
    pub fn decode(b: &[u8]) -> Option<NamespaceId> {
        if b.len() < 4096 {
            return None;
        }
        let blocks = u64::from_le_bytes(b[0..8].try_into().ok()?);
        let nlbaf = usize::from(b[25]);
        let format = usize::from(b[26] & 0xF);
        if format > nlbaf {
            return None;
        }
        let o = 128 + 4 * format;
        let lbaf = u32::from_le_bytes(b[o..o + 4].try_into().ok()?);
        let lbads = (lbaf >> 16) & 0xFF;
        if !(9..=16).contains(&lbads) {
            return None;
        }
        Some(NamespaceId {
            blocks,
            lba_bytes: 1 << lbads,
            metadata_bytes: lbaf as u16,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_of_qemu_nvme() {
        // QEMU's emulated controller: MQES 2047, CQR, TO 15 (7.5 s), DSTRD 0, CSS NVM,
        // MPSMIN 0, MPSMAX 4.
        let cap: u64 = 0x7ff | (1 << 16) | (15 << 24) | (1 << 37) | (4 << 52);
        let c = Capabilities::decode(cap);
        assert_eq!(c.max_queue_entries, 2048);
        assert!(c.contiguous_queues && c.nvm_command_set);
        assert_eq!(c.ready_timeout_ms, 7500);
        assert_eq!(c.doorbell_stride, 4);
        assert_eq!((c.min_page_bytes, c.max_page_bytes), (4096, 65536));
        assert_eq!(c.sq_tail_doorbell(0), 0x1000);
        assert_eq!(c.cq_head_doorbell(0), 0x1004);
        assert_eq!(c.sq_tail_doorbell(3), 0x1018);
        let wide = Capabilities::decode(2u64 << 32);
        assert_eq!(wide.doorbell_stride, 16);
        assert_eq!(wide.cq_head_doorbell(1), 0x1000 + 3 * 16);
    }

    #[test]
    fn entries_encode_and_decode() {
        let s = Sqe::rw(nvm::WRITE, 0xBEEF, 1, 0x1_2345_6789, 8).prps(0x1000, 0x2000);
        let b = s.to_bytes();
        assert_eq!(b[0], nvm::WRITE);
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), 0xBEEF);
        assert_eq!(s.cid(), 0xBEEF);
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(b[24..32].try_into().unwrap()), 0x1000);
        assert_eq!(u64::from_le_bytes(b[32..40].try_into().unwrap()), 0x2000);
        assert_eq!(
            u32::from_le_bytes(b[40..44].try_into().unwrap()),
            0x2345_6789
        );
        assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(b[48..52].try_into().unwrap()), 7);
        let c = Cqe::decode([7, 0, 5 | (1 << 16), 0xBEEF | (1 << 16) | (0x2 << 17)]);
        assert_eq!((c.result, c.sq_head, c.sq_id, c.cid), (7, 5, 1, 0xBEEF));
        assert!(c.phase && !c.ok());
        assert_eq!(c.status_parts(), (0, 2));
        assert!(Cqe::decode([0, 0, 0, 1 << 16]).ok());
        assert!(Cqe::decode([0, 0, 0, 1 << 31]).do_not_retry());
        let g = Sqe::rw(nvm::READ, 3, 1, 0, 8).sgl(0x1_0000_2000, 4096);
        let b = g.to_bytes();
        assert_eq!(b[1] >> 6, 0b01, "PSDT: SGL");
        assert_eq!(
            u64::from_le_bytes(b[24..32].try_into().unwrap()),
            0x1_0000_2000
        );
        assert_eq!(u32::from_le_bytes(b[32..36].try_into().unwrap()), 4096);
        assert_eq!(b[39], 0, "data block descriptor");
        assert_eq!(g.cid(), 3);
    }

    #[test]
    fn prps_for_one_two_and_many_pages() {
        let list = 0x10_0000;
        assert_eq!(prp_plan(0x5000, 4096, list).prp2, 0);
        assert_eq!(prp_plan(0x5200, 100, list).prp2, 0);
        let two = prp_plan(0x5200, 4096, list);
        assert_eq!((two.prp1, two.prp2), (0x5200, 0x6000));
        assert!(two.list.is_empty());
        let many = prp_plan(0x5000, 5 * 4096, list);
        assert_eq!((many.prp1, many.prp2), (0x5000, list));
        assert_eq!(many.list, vec![0x6000, 0x7000, 0x8000, 0x9000]);
        // An offset first page adds one more page.
        let off = prp_plan(0x5800, 3 * 4096, list);
        assert_eq!(off.list, vec![0x6000, 0x7000, 0x8000]);
    }

    #[test]
    fn long_prp_lists_chain() {
        let entries: Vec<u64> = (1..=1100u64).map(|i| i << 12).collect();
        let pages = prp_list_pages(&entries, 0x40_0000);
        assert_eq!(pages.len(), 3);
        assert_eq!(pages[0].len(), 512);
        assert_eq!(pages[0][511], 0x40_1000, "chain to the second list page");
        assert_eq!(pages[1][511], 0x40_2000);
        assert_eq!(pages[2].len(), 1100 - 2 * 511);
        let flat: Vec<u64> = pages
            .iter()
            .enumerate()
            .flat_map(|(i, p)| {
                if i + 1 < pages.len() {
                    p[..511].to_vec()
                } else {
                    p.clone()
                }
            })
            .collect();
        assert_eq!(flat, entries);
        assert_eq!(prp_list_pages(&entries[..512], 0).len(), 1);
    }

    #[test]
    fn identify_structures_decode() {
        let mut c = vec![0u8; 4096];
        c[4..9].copy_from_slice(b"cfs0 ");
        c[24..28].copy_from_slice(b"QEMU");
        c[77] = 7;
        c[516..520].copy_from_slice(&1u32.to_le_bytes());
        c[520..522].copy_from_slice(&0b1100u16.to_le_bytes());
        let id = ControllerId::decode(&c).unwrap();
        assert_eq!((id.serial.as_str(), id.model.as_str()), ("cfs0", "QEMU"));
        assert_eq!(id.max_transfer_bytes(4096, usize::MAX), 512 << 10);
        assert!(id.write_zeroes() && id.dataset_management());
        assert!(ControllerId::decode(&c[..100]).is_none());

        let mut n = vec![0u8; 4096];
        n[0..8].copy_from_slice(&2048u64.to_le_bytes());
        n[25] = 1; // two formats
        n[26] = 1; // the second in use
        n[128 + 4..128 + 8].copy_from_slice(&(12u32 << 16).to_le_bytes());
        let ns = NamespaceId::decode(&n).unwrap();
        assert_eq!(
            (ns.blocks, ns.lba_bytes, ns.metadata_bytes),
            (2048, 4096, 0)
        );
        n[26] = 3; // beyond the formats listed
        assert!(NamespaceId::decode(&n).is_none());
    }
}

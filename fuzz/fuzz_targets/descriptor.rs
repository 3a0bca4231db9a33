//! VMDK descriptors found on a datastore (`vmdk_agent::vmdk::Descriptor`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmdk_agent::vmdk::{new_disk_uuid, Descriptor, MAX_DESCRIPTOR_BYTES, SECTOR};
use vmdk_protocol::name::validate_volume;
use vmdk_protocol::size::{MAX_SIZE_MB, MIB};

fuzz_target!(|data: &[u8]| {
    if data.len() as u64 > MAX_DESCRIPTOR_BYTES {
        return; // never read: larger files are not descriptors
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(d) = Descriptor::parse(&text) {
        assert!(!d.extents.is_empty());
        let _ = (d.is_thin(), d.uuid());
        // Sizes are exact, never wrapped, never zero (issue 7, finding
        // 13), and what parse accepted renders back to itself.
        {
            let exact: u128 = d
                .extents
                .iter()
                .map(|e| u128::from(e.sectors) * u128::from(SECTOR))
                .sum();
            assert!(exact <= u128::from(u64::MAX), "accepted a descriptor of {exact} bytes");
            assert!(exact > 0, "accepted a 0-byte disk");
            assert_eq!(u128::from(d.capacity_bytes()), exact);
            let rendered = d.render();
            assert_eq!(Descriptor::parse(&rendered).as_ref(), Ok(&d), "rendered:\n{rendered}");
        }
    }

    // What the agent writes reads back as written: a descriptor for the
    // first line as a volume name, at a size drawn from the input.
    let name = text.lines().next().unwrap_or("");
    if validate_volume(name).is_ok() {
        let h = data.iter().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
        });
        let capacity = h % (MAX_SIZE_MB * MIB) + 1;
        let mut random = [0u8; 16];
        random[..8].copy_from_slice(&h.to_le_bytes());
        let flat = format!("{name}-flat.vmdk");
        let d = Descriptor::new_vmfs(&flat, capacity, h & 1 == 1, &new_disk_uuid(random), h as u32);
        let back = Descriptor::parse(&d.render()).expect("written descriptor parses");
        assert_eq!(back, d);
        let got = back.capacity_bytes();
        assert!(got >= capacity && got - capacity < SECTOR);
        assert_eq!(back.extents[0].file, flat);
    }
});

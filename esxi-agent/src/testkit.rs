//! Test and bench fixtures (feature `testkit`): write volumes straight to a
//! datastore directory, in the agent's own on-disk format but without the
//! fsyncs of a real create, so a datastore with thousands of volumes takes
//! a moment to build.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use vmdk_protocol::options as opt;
use vmdk_protocol::AttachStatus;

use crate::datastore::{VolumeFiles, DEFAULT_VMGROUP, DOCKVOLS};
use crate::meta::{VolumeMeta, META_VERSION};
use crate::vmdk::{new_disk_uuid, Descriptor};

/// Writes volume `volume` (descriptor, sparse extent with `used` bytes of
/// data at its start, metadata) into `<ds_root>/dockvols/_DEFAULT`.
/// `extra` options are added to the metadata's `volOpts`.
pub fn write_volume(ds_root: &Path, volume: &str, capacity: u64, used: u64, extra: &[(&str, &str)]) -> io::Result<()> {
    let dir = ds_root.join(DOCKVOLS).join(DEFAULT_VMGROUP);
    std::fs::create_dir_all(&dir)?;
    let files = VolumeFiles::new(volume);
    let mut seed = [0u8; 16];
    for (i, b) in volume.bytes().enumerate() {
        seed[i % 16] = seed[i % 16].wrapping_mul(31).wrapping_add(b);
    }
    let d = Descriptor::new_vmfs(&files.flat, capacity, true, &new_disk_uuid(seed), 0x1234_5678);
    std::fs::write(dir.join(&files.descriptor), d.render())?;
    let f = std::fs::File::create(dir.join(&files.flat))?;
    if used > 0 {
        io::Write::write_all(&mut &f, &vec![0x5a; used as usize])?;
    }
    f.set_len(capacity)?;
    let mut vol_opts: BTreeMap<String, String> = [
        (opt::DISKFORMAT, "thin"),
        (opt::FSTYPE, "ext4"),
        (opt::ACCESS, "read-write"),
        (opt::ATTACH_AS, "independent_persistent"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in extra {
        vol_opts.insert(k.to_string(), v.to_string());
    }
    let meta = VolumeMeta {
        version: META_VERSION,
        status: AttachStatus::Detached,
        vol_opts,
        created: "2026-01-01T00:00:00Z".into(),
        created_by: "fixture-vm".into(),
        attached_vm: None,
        attached_device: None,
        attached_at: None,
        formatted: None,
        policy_state: None,
    };
    std::fs::write(dir.join(&files.meta), meta.encode())
}

//! `.vmfd` sidecars found on a datastore (`vmdk_agent::meta::VolumeMeta`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmdk_agent::meta::{VolumeMeta, MAX_META_BYTES, META_VERSION};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = VolumeMeta::decode(data) {
        assert!(data.len() as u64 <= MAX_META_BYTES);
        assert_eq!(m.version, META_VERSION);
        let bytes = m.encode();
        assert_eq!(VolumeMeta::decode(&bytes).expect("encoded sidecar decodes"), m);
    }
});

//! The plugin's `mounts.json` (`vmdk_plugin::state::PluginState`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmdk_plugin::state::{PluginState, STATE_VERSION};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = PluginState::decode(data) {
        assert_eq!(s.version, STATE_VERSION);
        assert_eq!(PluginState::decode(&s.encode()).as_ref(), Ok(&s));
    }
});

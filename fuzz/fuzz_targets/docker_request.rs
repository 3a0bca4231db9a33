//! Docker's `VolumeDriver.*` request bodies (`vmdk_plugin::plugin::decode_request`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::json;
use vmdk_plugin::plugin::{decode_request, DockerRequest};

fuzz_target!(|data: &[u8]| {
    let Ok(req) = decode_request(data) else {
        return;
    };
    if data.iter().all(u8::is_ascii_whitespace) {
        assert_eq!(req, DockerRequest::default());
    }
    // What was decoded is what the body said: written back as Docker
    // would, it decodes to the same request.
    let body = json!({"Name": req.name, "Opts": req.opts, "ID": req.id});
    let again = decode_request(body.to_string().as_bytes()).expect("re-encoded request decodes");
    assert_eq!(again, req);
});

//! The agent API's bodies: requests from guests (`vmdk_agent::api::json_body`)
//! and the protocol's response types a guest decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use vmdk_agent::api::json_body;
use vmdk_protocol::{CreateRequest, ErrorBody, FormattedRequest, VolumeInfo};

/// Whatever decodes, encodes and decodes to the same value.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<T>(data) {
        let bytes = serde_json::to_vec(&v).expect("serializes");
        assert_eq!(
            serde_json::from_slice::<T>(&bytes).expect("re-encoded value decodes"),
            v
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let blank = data.iter().all(u8::is_ascii_whitespace);
    match json_body::<CreateRequest>(data) {
        Ok(req) => {
            if blank {
                assert_eq!(req, CreateRequest::default());
            }
            let bytes = serde_json::to_vec(&req).expect("serializes");
            assert_eq!(
                json_body::<CreateRequest>(&bytes).expect("re-encoded request decodes"),
                req
            );
        }
        Err(e) => assert!(!blank && !e.to_string().is_empty()),
    }
    match json_body::<FormattedRequest>(data) {
        Ok(req) => {
            let bytes = serde_json::to_vec(&req).expect("serializes");
            assert_eq!(
                json_body::<FormattedRequest>(&bytes).expect("re-encoded request decodes"),
                req
            );
        }
        Err(e) => assert!(!blank && !e.to_string().is_empty()),
    }
    round_trip::<VolumeInfo>(data);
    round_trip::<ErrorBody>(data);
});

//! VSAN policy expressions (`vmdk_agent::policy::PolicyExpr::parse`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmdk_agent::policy::PolicyExpr;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let p = match PolicyExpr::parse(&text) {
        Ok(p) => p,
        Err(e) => {
            // The error shows a caret under the column: it must point into
            // the text (or just past it) and render without panicking.
            assert!(
                e.column >= 1 && e.column <= text.chars().count() + 1,
                "column {}",
                e.column
            );
            assert!(e.to_string().contains('^'));
            return;
        }
    };
    assert!(!p.rules.is_empty());
    for (i, r) in p.rules.iter().enumerate() {
        assert!(!r.capability.is_empty() && !r.capability.chars().any(char::is_control));
        assert!(p.rules[..i].iter().all(|o| o.capability != r.capability));
    }
    let _ = p.unknown_capabilities();
    // The canonical form reparses to the same policy.
    let canonical = p.to_string();
    assert_eq!(PolicyExpr::parse(&canonical).as_ref(), Ok(&p), "canonical {canonical}");
});

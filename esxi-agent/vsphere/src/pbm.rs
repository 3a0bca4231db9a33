//! SPBM (the PBM API at `/pbm`, vCenter only): request bodies and response
//! parsers for the four calls the backend needs.

use crate::types::{Moref, Profile, ProfileId, ProfileRule, RuleValue, VsanRule};
use crate::xml::{Node, Writer};

pub(crate) const PBM_NS: &str = "urn:pbm";

fn method(name: &str, this: &Moref) -> Writer {
    let mut w = Writer::new();
    w.open_ns(name, PBM_NS);
    w.moref("_this", &this.kind, &this.value);
    w
}

fn finish(mut w: Writer, name: &str) -> String {
    w.close(name);
    w.finish()
}

pub(crate) fn retrieve_service_content() -> String {
    finish(
        method(
            "PbmRetrieveServiceContent",
            &Moref::new("PbmServiceInstance", "ServiceInstance"),
        ),
        "PbmRetrieveServiceContent",
    )
}

/// The profile manager from `PbmRetrieveServiceContent`.
pub(crate) fn parse_profile_manager(resp: &Node) -> Result<Moref, String> {
    let pm = resp
        .path(&["returnval", "profileManager"])
        .ok_or("no returnval.profileManager")?;
    let kind = pm.mo_type.clone().ok_or("profileManager without a type")?;
    if pm.trimmed().is_empty() {
        return Err("an empty profileManager".into());
    }
    Ok(Moref::new(kind, pm.trimmed()))
}

/// Every storage requirement profile's id.
pub(crate) fn query_profile(pm: &Moref) -> String {
    let mut w = method("PbmQueryProfile", pm);
    w.open("resourceType")
        .text("resourceType", "STORAGE")
        .close("resourceType")
        .text("profileCategory", "REQUIREMENT");
    finish(w, "PbmQueryProfile")
}

pub(crate) fn parse_profile_ids(resp: &Node) -> Result<Vec<ProfileId>, String> {
    resp.children_named("returnval")
        .map(|rv| {
            rv.child_text("uniqueId")
                .filter(|id| !id.is_empty())
                .map(|id| ProfileId(id.to_owned()))
                .ok_or_else(|| "a profile id without uniqueId".to_string())
        })
        .collect()
}

pub(crate) fn retrieve_content(pm: &Moref, ids: &[ProfileId]) -> String {
    let mut w = method("PbmRetrieveContent", pm);
    for id in ids {
        w.open("profileIds").text("uniqueId", &id.0).close("profileIds");
    }
    finish(w, "PbmRetrieveContent")
}

pub(crate) fn parse_profiles(resp: &Node) -> Result<Vec<Profile>, String> {
    resp.children_named("returnval")
        .map(|rv| {
            let id = rv
                .path(&["profileId", "uniqueId"])
                .map(|n| n.trimmed())
                .filter(|id| !id.is_empty())
                .ok_or("a profile without profileId")?;
            Ok(Profile {
                id: ProfileId(id.to_owned()),
                name: rv.child_text("name").unwrap_or_default().to_owned(),
                description: rv
                    .child_text("description")
                    .filter(|d| !d.is_empty())
                    .map(str::to_owned),
                rules: parse_rules(rv),
            })
        })
        .collect()
}

/// The capabilities of a profile's `PbmCapabilitySubProfileConstraints`:
/// `constraints/subProfiles/capability{id{namespace,id}, constraint/propertyInstance/value}`.
fn parse_rules(profile: &Node) -> Vec<ProfileRule> {
    let Some(constraints) = profile.child("constraints") else {
        return Vec::new();
    };
    constraints
        .children_named("subProfiles")
        .flat_map(|sub| sub.children_named("capability"))
        .map(|cap| ProfileRule {
            namespace: cap
                .path(&["id", "namespace"])
                .map(|n| n.trimmed().to_owned())
                .unwrap_or_default(),
            capability: cap
                .path(&["id", "id"])
                .map(|n| n.trimmed().to_owned())
                .unwrap_or_default(),
            value: cap
                .path(&["constraint", "propertyInstance", "value"])
                .and_then(parse_value),
        })
        .collect()
}

/// A scalar `value` by its `xsi:type`.
fn parse_value(v: &Node) -> Option<RuleValue> {
    let text = v.trimmed();
    match v.xsi_type.as_deref()? {
        "int" | "short" | "byte" => text.parse().ok().map(RuleValue::Int),
        "long" => text.parse().ok().map(RuleValue::Long),
        "boolean" => match text {
            "true" | "1" => Some(RuleValue::Bool(true)),
            "false" | "0" => Some(RuleValue::Bool(false)),
            _ => None,
        },
        "string" => Some(RuleValue::String(v.text.clone())),
        _ => None,
    }
}

/// `PbmCreate` of a requirement profile with one VSAN sub-profile holding
/// every rule.
pub(crate) fn create(pm: &Moref, name: &str, description: &str, rules: &[VsanRule]) -> String {
    let mut w = method("PbmCreate", pm);
    // PbmCapabilityProfileCreateSpec: name, description, category, resourceType, constraints
    w.open("createSpec")
        .text("name", name)
        .text("description", description)
        .text("category", "REQUIREMENT")
        .open("resourceType")
        .text("resourceType", "STORAGE")
        .close("resourceType")
        .open_typed("constraints", "PbmCapabilitySubProfileConstraints")
        // PbmCapabilitySubProfile: name, capability, forceProvision
        .open("subProfiles")
        .text("name", "VSAN sub-profile");
    for rule in rules {
        // PbmCapabilityInstance: id, constraint; PbmCapabilityMetadataUniqueId:
        // namespace, id; PbmCapabilityPropertyInstance: id, operator, value.
        w.open("capability")
            .open("id")
            .text("namespace", "VSAN")
            .text("id", &rule.capability)
            .close("id")
            .open("constraint")
            .open("propertyInstance")
            .text("id", &rule.capability);
        match &rule.value {
            RuleValue::Int(i) => w.typed_text("value", "xsd:int", &i.to_string()),
            RuleValue::Long(i) => w.typed_text("value", "xsd:long", &i.to_string()),
            RuleValue::Bool(b) => w.typed_text("value", "xsd:boolean", &b.to_string()),
            RuleValue::String(s) => w.typed_text("value", "xsd:string", s),
        };
        w.close("propertyInstance").close("constraint").close("capability");
    }
    w.close("subProfiles").close("constraints").close("createSpec");
    finish(w, "PbmCreate")
}

pub(crate) fn parse_created(resp: &Node) -> Result<ProfileId, String> {
    resp.path(&["returnval", "uniqueId"])
        .map(|n| n.trimmed())
        .filter(|id| !id.is_empty())
        .map(|id| ProfileId(id.to_owned()))
        .ok_or_else(|| "no returnval.uniqueId".into())
}

pub(crate) fn delete(pm: &Moref, ids: &[ProfileId]) -> String {
    let mut w = method("PbmDelete", pm);
    for id in ids {
        w.open("profileId").text("uniqueId", &id.0).close("profileId");
    }
    finish(w, "PbmDelete")
}

/// `PbmDelete` answers with an outcome per profile; one with a fault did
/// not go. Returns (profile id, fault type, message) for each failure.
pub(crate) fn parse_delete_failures(resp: &Node) -> Vec<(String, String, String)> {
    resp.children_named("returnval")
        .filter_map(|rv| {
            let fault = rv.child("fault")?;
            let id = rv
                .path(&["profileId", "uniqueId"])
                .map(|n| n.trimmed().to_owned())
                .unwrap_or_default();
            let (ty, msg) = crate::vim::localized_fault(fault);
            Some((id, ty, msg))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vim::{body, Body};
    use crate::xml::parse;

    fn response(name: &str) -> Node {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        let env = parse(&std::fs::read(&path).unwrap()).unwrap();
        match body(&env).unwrap() {
            Body::Response(r) => r.clone(),
            Body::Fault { fault_type, message } => panic!("{name}: {fault_type}: {message}"),
        }
    }

    fn pm() -> Moref {
        Moref::new("PbmProfileProfileManager", "ProfileManager")
    }

    #[test]
    fn parses_service_content_ids_profiles_and_created_id() {
        assert_eq!(
            parse_profile_manager(&response("pbm_service_content.xml")).unwrap(),
            pm()
        );
        let ids = parse_profile_ids(&response("pbm_query_profile.xml")).unwrap();
        assert_eq!(ids.len(), 4);
        assert_eq!(ids[0], ProfileId("aa6d5a82-1c88-45da-85d3-3d74b91a5bad".into()));
        let profiles = parse_profiles(&response("pbm_retrieve_content.xml")).unwrap();
        assert_eq!(profiles.len(), 2);
        assert_eq!(profiles[0].name, "SW=2");
        assert_eq!(profiles[1].name, "vSAN Default Storage Policy");
        assert_eq!(profiles[1].id, ids[0]);
        let vsan = |capability: &str, value: RuleValue| ProfileRule {
            namespace: "VSAN".into(),
            capability: capability.into(),
            value: Some(value),
        };
        assert_eq!(
            profiles[0].rules,
            vec![
                vsan("stripeWidth", RuleValue::Int(2)),
                vsan("forceProvisioning", RuleValue::Bool(true))
            ]
        );
        assert_eq!(profiles[1].rules.len(), 5);
        assert_eq!(
            parse_created(&response("pbm_create.xml")).unwrap(),
            ProfileId("410fb86a-26d2-4c02-966b-0857acd1952b".into())
        );
        assert!(parse_delete_failures(&response("pbm_delete.xml")).is_empty());
    }

    #[test]
    fn delete_outcomes_with_faults_are_reported() {
        let xml = br#"<PbmDeleteResponse xmlns="urn:pbm" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
          <returnval><profileId><uniqueId>p1</uniqueId></profileId></returnval>
          <returnval><profileId><uniqueId>p2</uniqueId></profileId><fault><fault xsi:type="PbmFaultProfileStorageFault"/>
          <localizedMessage>Profile is in use</localizedMessage></fault></returnval></PbmDeleteResponse>"#;
        let failures = parse_delete_failures(&parse(xml).unwrap());
        assert_eq!(
            failures,
            vec![(
                "p2".to_string(),
                "PbmFaultProfileStorageFault".to_string(),
                "Profile is in use".to_string()
            )]
        );
    }

    #[test]
    fn create_body_keeps_xsd_order_and_types_values() {
        let body = create(
            &pm(),
            "SW=2 & more",
            "from vmdk",
            &[
                VsanRule {
                    capability: "stripeWidth".into(),
                    value: RuleValue::Int(2),
                },
                VsanRule {
                    capability: "forceProvisioning".into(),
                    value: RuleValue::Bool(true),
                },
            ],
        );
        assert_eq!(
            body,
            "<PbmCreate xmlns=\"urn:pbm\"><_this type=\"PbmProfileProfileManager\">ProfileManager</_this>\
             <createSpec><name>SW=2 &amp; more</name><description>from vmdk</description>\
             <category>REQUIREMENT</category><resourceType><resourceType>STORAGE</resourceType></resourceType>\
             <constraints xsi:type=\"PbmCapabilitySubProfileConstraints\"><subProfiles><name>VSAN sub-profile</name>\
             <capability><id><namespace>VSAN</namespace><id>stripeWidth</id></id><constraint><propertyInstance>\
             <id>stripeWidth</id><value xsi:type=\"xsd:int\">2</value></propertyInstance></constraint></capability>\
             <capability><id><namespace>VSAN</namespace><id>forceProvisioning</id></id><constraint><propertyInstance>\
             <id>forceProvisioning</id><value xsi:type=\"xsd:boolean\">true</value></propertyInstance></constraint>\
             </capability></subProfiles></constraints></createSpec></PbmCreate>"
        );
        assert_eq!(
            query_profile(&pm()),
            "<PbmQueryProfile xmlns=\"urn:pbm\"><_this type=\"PbmProfileProfileManager\">ProfileManager</_this>\
             <resourceType><resourceType>STORAGE</resourceType></resourceType>\
             <profileCategory>REQUIREMENT</profileCategory></PbmQueryProfile>"
        );
    }
}

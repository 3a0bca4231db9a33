//! Where a disk goes on a VM: the SCSI slot allocator of the `vsphere`
//! backend, a pure function with its own table of tests.
//!
//! vSphere's rules (VMware's "SCSI and SATA controller" limits, and the
//! original vDVS `disk_attach`): a VM has at most four SCSI controllers
//! (bus numbers 0–3); each has units 0–15, and unit 7 is the controller's
//! own, so a controller holds 15 disks. vmdk attaches volumes only to
//! ParaVirtual SCSI (PVSCSI) controllers, as the original did, and adds one
//! when every PVSCSI slot is taken and a bus number is free. The simulator
//! accepts unit 7 and overfull controllers, so these rules are enforced
//! here and tested here, not by it.

use std::fmt;

/// Units on a SCSI controller: 0–15.
pub const UNITS_PER_CONTROLLER: u32 = 16;
/// The unit a SCSI controller itself occupies.
pub const CONTROLLER_UNIT: u32 = 7;
/// SCSI controllers a VM may have (bus numbers 0–3).
pub const MAX_CONTROLLERS: u32 = 4;
/// The most disks one VM can have on SCSI controllers.
pub const MAX_DISKS: u32 = MAX_CONTROLLERS * (UNITS_PER_CONTROLLER - 1);

/// The kind of a SCSI controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControllerKind {
    /// `ParaVirtualSCSIController`: where vmdk puts volumes.
    ParaVirtual,
    /// Any other SCSI controller (LSI Logic, BusLogic...): its bus number
    /// counts towards the four, its slots are never used.
    Other,
}

/// A SCSI controller of a VM, as read from its device list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Controller {
    /// Device key.
    pub key: i32,
    /// SCSI bus number (0–3).
    pub bus: u32,
    /// Its kind.
    pub kind: ControllerKind,
    /// Units taken by disks (or anything else) on it.
    pub used_units: Vec<u32>,
}

/// Where the next disk goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// A free unit on an existing PVSCSI controller.
    Existing {
        /// The controller's device key.
        controller_key: i32,
        /// Its bus number.
        bus: u32,
        /// The unit.
        unit: u32,
    },
    /// A new PVSCSI controller must be added on `bus`; the disk goes to
    /// `unit` on it.
    NewController {
        /// The free bus number for the new controller.
        bus: u32,
        /// The unit.
        unit: u32,
    },
}

/// Every slot is taken: the original's "maximum number of supported
/// volumes".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoFreeSlot;

impl fmt::Display for NoFreeSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "maximum number of supported volumes attached ({MAX_CONTROLLERS} SCSI controllers, {} disks each)",
            UNITS_PER_CONTROLLER - 1
        )
    }
}

/// The first free unit (never 7) on the PVSCSI controller with the lowest
/// bus number that has one; else a new PVSCSI controller on the lowest free
/// bus number, unit 0; else [`NoFreeSlot`]. Units out of range in the input
/// are ignored; a bus number reported twice counts once.
pub fn pick_slot(controllers: &[Controller]) -> Result<Slot, NoFreeSlot> {
    let mut pv: Vec<&Controller> = controllers
        .iter()
        .filter(|c| c.kind == ControllerKind::ParaVirtual && c.bus < MAX_CONTROLLERS)
        .collect();
    pv.sort_by_key(|c| (c.bus, c.key));
    for c in pv {
        if let Some(unit) = (0..UNITS_PER_CONTROLLER).find(|u| *u != CONTROLLER_UNIT && !c.used_units.contains(u)) {
            return Ok(Slot::Existing {
                controller_key: c.key,
                bus: c.bus,
                unit,
            });
        }
    }
    match (0..MAX_CONTROLLERS).find(|b| !controllers.iter().any(|c| c.bus == *b)) {
        Some(bus) => Ok(Slot::NewController { bus, unit: 0 }),
        None => Err(NoFreeSlot),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ControllerKind::*;

    fn pv(key: i32, bus: u32, used: &[u32]) -> Controller {
        Controller {
            key,
            bus,
            kind: ParaVirtual,
            used_units: used.to_vec(),
        }
    }

    fn full() -> Vec<u32> {
        (0..16).filter(|u| *u != 7).collect()
    }

    #[test]
    fn the_slot_table() {
        let lsi = |bus| Controller {
            key: 1000 + bus as i32,
            bus,
            kind: Other,
            used_units: vec![0],
        };
        let cases: Vec<(&str, Vec<Controller>, Result<Slot, NoFreeSlot>)> = vec![
            (
                "no controller at all",
                vec![],
                Ok(Slot::NewController { bus: 0, unit: 0 }),
            ),
            (
                "an empty PVSCSI controller",
                vec![pv(202, 0, &[])],
                Ok(Slot::Existing {
                    controller_key: 202,
                    bus: 0,
                    unit: 0,
                }),
            ),
            (
                "the boot disk on unit 0",
                vec![pv(202, 0, &[0])],
                Ok(Slot::Existing {
                    controller_key: 202,
                    bus: 0,
                    unit: 1,
                }),
            ),
            (
                "units 0-6 taken: 7 is skipped",
                vec![pv(202, 0, &[0, 1, 2, 3, 4, 5, 6])],
                Ok(Slot::Existing {
                    controller_key: 202,
                    bus: 0,
                    unit: 8,
                }),
            ),
            (
                "a gap is filled first",
                vec![pv(202, 0, &[0, 1, 3])],
                Ok(Slot::Existing {
                    controller_key: 202,
                    bus: 0,
                    unit: 2,
                }),
            ),
            (
                "a full controller: a new one on bus 1",
                vec![pv(202, 0, &full())],
                Ok(Slot::NewController { bus: 1, unit: 0 }),
            ),
            (
                "the lowest bus with room wins, whatever the order",
                vec![pv(300, 2, &[]), pv(202, 0, &full()), pv(250, 1, &[0])],
                Ok(Slot::Existing {
                    controller_key: 250,
                    bus: 1,
                    unit: 1,
                }),
            ),
            (
                "an LSI Logic controller's slots are never used, its bus is taken",
                vec![lsi(0)],
                Ok(Slot::NewController { bus: 1, unit: 0 }),
            ),
            (
                "a free bus number between used ones",
                vec![pv(202, 0, &full()), lsi(1), pv(400, 3, &full())],
                Ok(Slot::NewController { bus: 2, unit: 0 }),
            ),
            (
                "four full controllers: no slot",
                (0..4).map(|b| pv(202 + b as i32, b, &full())).collect(),
                Err(NoFreeSlot),
            ),
            (
                "four controllers, one of them LSI: no slot when the PVSCSI ones are full",
                vec![lsi(0), pv(1, 1, &full()), pv(2, 2, &full()), pv(3, 3, &full())],
                Err(NoFreeSlot),
            ),
            (
                "unit 7 reported as used (a simulator) changes nothing",
                vec![pv(202, 0, &[7, 0])],
                Ok(Slot::Existing {
                    controller_key: 202,
                    bus: 0,
                    unit: 1,
                }),
            ),
        ];
        for (what, controllers, want) in cases {
            assert_eq!(pick_slot(&controllers), want, "{what}");
        }
    }

    #[test]
    fn sixty_disks_fill_four_controllers_and_the_sixty_first_is_refused() {
        let mut controllers: Vec<Controller> = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..MAX_DISKS {
            let slot = pick_slot(&controllers).unwrap_or_else(|e| panic!("disk {i}: {e}"));
            let (bus, unit) = match slot {
                Slot::Existing { bus, unit, .. } => (bus, unit),
                Slot::NewController { bus, unit } => {
                    controllers.push(pv(1000 + bus as i32, bus, &[]));
                    (bus, unit)
                }
            };
            assert_ne!(unit, CONTROLLER_UNIT);
            assert!(unit < UNITS_PER_CONTROLLER && bus < MAX_CONTROLLERS);
            assert!(seen.insert((bus, unit)), "slot {bus}:{unit} handed out twice");
            controllers
                .iter_mut()
                .find(|c| c.bus == bus)
                .unwrap()
                .used_units
                .push(unit);
        }
        assert_eq!(seen.len(), 60);
        assert_eq!(pick_slot(&controllers), Err(NoFreeSlot));
        assert_eq!(
            NoFreeSlot.to_string(),
            "maximum number of supported volumes attached (4 SCSI controllers, 15 disks each)"
        );
    }
}

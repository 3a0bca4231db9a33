// Command vcsim runs govmomi's vSphere simulator (Debian's
// golang-github-vmware-govmomi-dev 0.24.2) for the vSphere client's tests.
//
// It serves TLS with a freshly generated RSA-2048 self-signed certificate
// (govmomi's built-in test certificate is RSA-1024, which rustls refuses),
// prints one JSON line describing the inventory on stdout, and exits cleanly,
// deleting its temporary datastores, on SIGTERM, SIGINT or when stdin closes.
//
// Its virtual disks behave like ESXi's (see esxiDiskManager below): a
// descriptor and a flat extent of the requested size, as the test
// hypervisor bridge (tests/support/bridge.rs) needs to hand them to QEMU.
//
// Build in GOPATH mode (see tests/vcsim/build.sh):
//
//	GO111MODULE=off GOPROXY=off GOPATH=<dir>:/usr/share/gocode go build
package main

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"encoding/xml"
	"flag"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmware/govmomi/object"
	pbmmethods "github.com/vmware/govmomi/pbm/methods"
	pbmsim "github.com/vmware/govmomi/pbm/simulator"
	pbmtypes "github.com/vmware/govmomi/pbm/types"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/simulator/esx"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

type datastore struct {
	Name  string `json:"name"`
	Moref string `json:"moref"`
	Path  string `json:"path"`
}

type vm struct {
	Name  string `json:"name"`
	Moref string `json:"moref"`
	UUID  string `json:"uuid"`
	Host  string `json:"host"`
}

type info struct {
	URL              string      `json:"url"`
	Model            string      `json:"model"`
	Username         string      `json:"username"`
	Password         string      `json:"password"`
	ThumbprintSHA256 string      `json:"thumbprint_sha256"`
	ThumbprintSHA1   string      `json:"thumbprint_sha1"`
	CertPEM          string      `json:"cert_pem"`
	CAPEM            string      `json:"ca_pem"`
	Datacenter       string      `json:"datacenter"`
	Datacenters      []string    `json:"datacenters"`
	Datastores       []datastore `json:"datastores"`
	VMs              []vm        `json:"vms"`
	Pid              int         `json:"pid"`
}

func fingerprint(sum []byte) string {
	parts := make([]string, len(sum))
	for i, b := range sum {
		parts[i] = fmt.Sprintf("%02X", b)
	}
	return strings.Join(parts, ":")
}

// certificates makes a throw-away RSA-2048 certificate authority and an
// RSA-2048 server certificate it signs, for 127.0.0.1, ::1 and localhost,
// valid for a day. It returns the server's TLS certificate, the server
// certificate's DER and the authority's DER.
func certificates() (tls.Certificate, []byte, []byte, error) {
	fail := func(err error) (tls.Certificate, []byte, []byte, error) {
		return tls.Certificate{}, nil, nil, err
	}
	serial := func() (*big.Int, error) {
		return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	}
	now := time.Now()

	caKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return fail(err)
	}
	caSerial, err := serial()
	if err != nil {
		return fail(err)
	}
	caTmpl := x509.Certificate{
		SerialNumber:          caSerial,
		Subject:               pkix.Name{CommonName: "vcsim test CA", Organization: []string{"vmdk tests"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, &caTmpl, &caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return fail(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return fail(err)
	}

	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return fail(err)
	}
	leafSerial, err := serial()
	if err != nil {
		return fail(err)
	}
	tmpl := x509.Certificate{
		SerialNumber:          leafSerial,
		Subject:               pkix.Name{CommonName: "localhost", Organization: []string{"vmdk tests"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1")},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, &tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return fail(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, der, caDER, nil
}

// announceRequests turns on the simulator's SOAP trace into a pipe and
// writes "vcsim: received METHOD" to stderr when a request for one of the
// methods arrives (the trace is written before any delay), so a test knows
// a call is in flight.
func announceRequests(methods []string) error {
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	simulator.Trace = true
	simulator.TraceFile = w
	go func() {
		lines := bufio.NewReaderSize(r, 1<<20)
		inRequest := false
		for {
			line, err := lines.ReadString('\n')
			switch {
			case strings.HasPrefix(line, "Request: "):
				inRequest = true
			case strings.HasPrefix(line, "Response: "):
				inRequest = false
			}
			if inRequest {
				for _, m := range methods {
					if strings.Contains(line, "<"+m+">") || strings.Contains(line, "<"+m+" ") {
						fmt.Fprintf(os.Stderr, "vcsim: received %s\n", m)
					}
				}
			}
			if err != nil {
				return
			}
		}
	}()
	return nil
}

// methodDelays parses "Method:ms,Method:ms".
func methodDelays(s string) (map[string]int, error) {
	m := map[string]int{}
	if s == "" {
		return m, nil
	}
	for _, item := range strings.Split(s, ",") {
		kv := strings.SplitN(item, ":", 2)
		if len(kv) != 2 {
			return nil, fmt.Errorf("-method-delay: %q is not Method:milliseconds", item)
		}
		ms, err := strconv.Atoi(kv[1])
		if err != nil || ms < 0 {
			return nil, fmt.Errorf("-method-delay: %q is not Method:milliseconds", item)
		}
		m[kv[0]] = ms
	}
	return m, nil
}

// ---------------------------------------------------------------------------
// ESXi-like virtual disks
//
// vcsim 0.24.2's VirtualDiskManager writes two EMPTY files for a new disk
// and ignores its capacity and type; ReconfigVM sets no backing uuid. A real
// guest (the test hypervisor bridge, tests/support/bridge.rs) needs a disk
// it can open, so these overrides make the simulator's disks look like what
// ESXi writes on VMFS:
//
//   - CreateVirtualDisk_Task writes `<name>.vmdk`, an ESXi descriptor in
//     exactly the form the agent's local backend writes
//     (esxi-agent/src/vmdk.rs, Descriptor::new_vmfs and render:
//     createType="vmfs", one extent `RW <sectors> VMFS "<name>-flat.vmdk"`,
//     a random ddb.uuid in VMware's NAA form `60 00 c2 9x ...`,
//     ddb.thinProvisioned = "1" for thin), and `<name>-flat.vmdk` sized to
//     the requested capacity. The extent is sparse for every type: thin is
//     sparse on ESXi too; preallocated and eagerZeroedThick would be
//     allocated (and zeroed) there, which only costs time and space here and
//     changes nothing a guest can read. It fails with FileAlreadyExists when
//     either file exists, naming the file, as ESXi does.
//   - CopyVirtualDisk_Task copies both files (the extent sparsely) and gives
//     the copy a new ddb.uuid and its own extent name.
//   - When a reconfiguration attaches a disk, its FlatVer2 backing gets the
//     `uuid` ESXi reports (ddb.uuid as `6000c29x-xxxx-xxxx-xxxx-xxxxxxxxxxxx`)
//     and the disk its capacity, both read from the descriptor.
//
// How: the simulator dispatches a SOAP call by reflection on the object
// registered under the call's moref in simulator.Map (Service.call uses
// MethodByName on it). So installESXiDisks registers an
// esxiDiskManager, which embeds the simulator's VirtualDiskManager by value
// (the property collector digs the mo type out of the first field) and
// defines the two methods, under the VirtualDiskManager's moref. A
// VirtualMachine cannot be replaced that way (the simulator type-asserts
// *simulator.VirtualMachine everywhere), so the backing uuid is set by a
// registry handler (Map.AddHandler), which the simulator calls synchronously
// from every Map.Update, including the one ReconfigVM_Task makes to
// config.hardware.device before the task completes.
//
// Left as the simulator does it: DeleteVirtualDisk_Task, MoveVirtualDisk_Task,
// QueryVirtualDiskUuid (a SHA-1 name UUID, not ESXi's form), disks created by
// a reconfiguration with fileOperation=create (the VMs' own disk1.vmdk stays
// two empty files).

// esxiDiskManager is the simulator's VirtualDiskManager with ESXi-like
// CreateVirtualDisk_Task and CopyVirtualDisk_Task.
type esxiDiskManager struct {
	simulator.VirtualDiskManager
}

// installESXiDisks registers the overrides; call it after model.Create.
func installESXiDisks() {
	ref := simulator.Map.VirtualDiskManager().Reference()
	orig := simulator.Map.Get(ref).(*simulator.VirtualDiskManager)
	simulator.Map.Put(&esxiDiskManager{*orig})
	simulator.Map.AddHandler(backingUUIDs{})
}

// resolve turns "[ds] path" into the file on the datastore's directory, as
// the simulator's (unexported) FileManager.resolve does, refusing paths that
// leave the datastore.
func resolve(dcRef *types.ManagedObjectReference, name string) (string, types.BaseMethodFault) {
	var p object.DatastorePath
	if !p.FromString(name) || p.Path == "" {
		return "", &types.InvalidDatastorePath{DatastorePath: name}
	}
	if dcRef == nil {
		if !simulator.Map.IsESX() {
			return "", &types.InvalidArgument{InvalidProperty: "dc"}
		}
		dcRef = &esx.Datacenter.Self
	}
	for _, e := range simulator.Map.All("Datastore") {
		ds := e.(*simulator.Datastore)
		if ds.Name != p.Datastore || !under(ds, *dcRef) {
			continue
		}
		dir := path.Clean(ds.Info.GetDatastoreInfo().Url)
		file := path.Join(dir, p.Path)
		if !strings.HasPrefix(file, dir+"/") {
			return "", &types.InvalidDatastorePath{DatastorePath: name}
		}
		return file, nil
	}
	return "", &types.InvalidDatastore{Name: p.Datastore}
}

// under reports whether entity e is in datacenter dc.
func under(e mo.Entity, dc types.ManagedObjectReference) bool {
	for parent := e.Entity().Parent; parent != nil; {
		if *parent == dc {
			return true
		}
		pe, ok := simulator.Map.Get(*parent).(mo.Entity)
		if !ok {
			return false
		}
		parent = pe.Entity().Parent
	}
	return false
}

// flatName is the extent of descriptor `name` ("x.vmdk" -> "x-flat.vmdk").
func flatName(name string) string {
	return strings.TrimSuffix(name, ".vmdk") + "-flat.vmdk"
}

// fileFault is the fault for an error on `file` (a datastore path).
func fileFault(file string, err error, otherwise types.BaseFileFault) types.BaseMethodFault {
	switch {
	case os.IsNotExist(err):
		otherwise = new(types.FileNotFound)
	case os.IsExist(err):
		otherwise = new(types.FileAlreadyExists)
	}
	otherwise.GetFileFault().File = file
	return otherwise.(types.BaseMethodFault)
}

// newDiskUUID is a random disk UUID in ESXi's form: NAA-6 with VMware's
// OUI (60 00 c2 9x ...), as esxi-agent/src/vmdk.rs new_disk_uuid.
func newDiskUUID() ([16]byte, uint32, error) {
	var u [16]byte
	var cid [4]byte
	if _, err := rand.Read(u[:]); err != nil {
		return u, 0, err
	}
	if _, err := rand.Read(cid[:]); err != nil {
		return u, 0, err
	}
	u[0], u[1], u[2], u[3] = 0x60, 0x00, 0xc2, 0x90|(u[3]&0x0f)
	return u, uint32(cid[0])<<24 | uint32(cid[1])<<16 | uint32(cid[2])<<8 | uint32(cid[3]), nil
}

// descriptor renders an ESXi descriptor byte for byte as the agent's
// Descriptor::new_vmfs(..).render() does (DDB keys sorted), except that the
// adapter type is the one asked for (the local backend always writes
// lsilogic, which is also what lsiLogic gives here).
func descriptor(flat string, capacity int64, thin bool, adapter string, uuid [16]byte, cid uint32) string {
	sectors := (capacity + 511) / 512
	heads := int64(255)
	if adapter == "ide" {
		heads = 16
	}
	cylinders := sectors * 512 / (heads * 63 * 512)
	hex := make([]string, 16)
	for i, b := range uuid {
		hex[i] = fmt.Sprintf("%02x", b)
	}
	ddb := map[string]string{
		"ddb.adapterType":        strings.ToLower(adapter),
		"ddb.deletable":          "true",
		"ddb.encoding":           "UTF-8",
		"ddb.geometry.cylinders": strconv.FormatInt(cylinders, 10),
		"ddb.geometry.heads":     strconv.FormatInt(heads, 10),
		"ddb.geometry.sectors":   "63",
		"ddb.longContentID":      strings.Join(hex[:12], "") + fmt.Sprintf("%08x", cid),
		"ddb.toolsVersion":       "0",
		"ddb.uuid":               strings.Join(hex[:8], " ") + "-" + strings.Join(hex[8:], " "),
		"ddb.virtualHWVersion":   "13",
	}
	if thin {
		ddb["ddb.thinProvisioned"] = "1"
	}
	keys := make([]string, 0, len(ddb))
	for k := range ddb {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	fmt.Fprintf(&b, "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=%08x\n", cid)
	b.WriteString("parentCID=ffffffff\nisNativeSnapshot=\"no\"\ncreateType=\"vmfs\"\n")
	fmt.Fprintf(&b, "\n# Extent description\nRW %d VMFS %q\n", sectors, flat)
	b.WriteString("\n# The Disk Data Base\n#DDB\n\n")
	for _, k := range keys {
		fmt.Fprintf(&b, "%s = %q\n", k, ddb[k])
	}
	return b.String()
}

// parsedDescriptor is what the overrides read back from a descriptor.
type parsedDescriptor struct {
	sectors int64
	thin    bool
	adapter string
	uuid    string // ddb.uuid as written
}

// readDescriptor reads a descriptor written by descriptor() (or ESXi): its
// one extent's size, thin flag, adapter and ddb.uuid. Bounded to 64 KiB.
func readDescriptor(file string) (parsedDescriptor, error) {
	var d parsedDescriptor
	f, err := os.Open(file)
	if err != nil {
		return d, err
	}
	defer f.Close()
	text, err := io.ReadAll(io.LimitReader(f, 64<<10))
	if err != nil {
		return d, err
	}
	d.adapter = "lsilogic"
	for _, line := range strings.Split(string(text), "\n") {
		line = strings.TrimSpace(line)
		fields := strings.Fields(line)
		if len(fields) >= 4 && (fields[0] == "RW" || fields[0] == "RDONLY") {
			n, err := strconv.ParseInt(fields[1], 10, 64)
			if err != nil {
				return d, fmt.Errorf("%s: bad extent line %q", file, line)
			}
			d.sectors += n
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		v = strings.Trim(strings.TrimSpace(v), `"`)
		switch strings.TrimSpace(k) {
		case "ddb.thinProvisioned":
			d.thin = v == "1"
		case "ddb.adapterType":
			d.adapter = v
		case "ddb.uuid":
			d.uuid = v
		}
	}
	if d.sectors == 0 {
		return d, fmt.Errorf("%s is not a disk descriptor (no extent)", file)
	}
	return d, nil
}

// writeDisk creates descriptor `file` (host path; `name` is its datastore
// path, for faults) and its flat extent of `capacity` bytes. Neither may
// exist. On failure nothing is left behind.
func writeDisk(file, name string, capacity int64, thin bool, adapter string) types.BaseMethodFault {
	for _, f := range []struct{ host, ds string }{{file, name}, {flatName(file), flatName(name)}} {
		if _, err := os.Lstat(f.host); err == nil {
			return fileFault(f.ds, nil, new(types.FileAlreadyExists))
		}
	}
	uuid, cid, err := newDiskUUID()
	if err != nil {
		return &types.CannotCreateFile{FileFault: types.FileFault{File: name}}
	}
	flat, err := os.OpenFile(flatName(file), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0600)
	if err != nil {
		return fileFault(flatName(name), err, new(types.CannotCreateFile))
	}
	err = flat.Truncate(capacity) // sparse, see above
	if cerr := flat.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(flatName(file))
		return fileFault(flatName(name), err, new(types.CannotCreateFile))
	}
	text := descriptor(filepath.Base(flatName(file)), capacity, thin, adapter, uuid, cid)
	desc, err := os.OpenFile(file, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0600)
	if err == nil {
		_, err = desc.WriteString(text)
		if cerr := desc.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(file)
		}
	}
	if err != nil {
		os.Remove(flatName(file))
		return fileFault(name, err, new(types.CannotCreateFile))
	}
	return nil
}

// diskTypes are the FileBackedVirtualDiskSpec.diskType values ESXi
// creates on VMFS that these overrides support, and whether each is thin.
var diskTypes = map[string]bool{
	string(types.VirtualDiskTypeThin):             true,
	string(types.VirtualDiskTypePreallocated):     false,
	string(types.VirtualDiskTypeThick):            false,
	string(types.VirtualDiskTypeEagerZeroedThick): false,
}

// CreateVirtualDiskTask: an ESXi descriptor and a flat extent of the size
// asked for (see the section comment).
func (m *esxiDiskManager) CreateVirtualDiskTask(_ *simulator.Context, req *types.CreateVirtualDisk_Task) soap.HasFault {
	task := simulator.CreateTask(m, "createVirtualDisk", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		file, fault := resolve(req.Datacenter, req.Name)
		if fault != nil {
			return nil, fault
		}
		spec, ok := req.Spec.(types.BaseFileBackedVirtualDiskSpec)
		if !ok {
			return nil, &types.InvalidArgument{InvalidProperty: "spec"}
		}
		fb := spec.GetFileBackedVirtualDiskSpec()
		thin, known := diskTypes[fb.DiskType]
		if !known {
			return nil, &types.InvalidArgument{InvalidProperty: "spec.diskType"}
		}
		if fb.CapacityKb <= 0 {
			return nil, &types.InvalidArgument{InvalidProperty: "spec.capacityKb"}
		}
		if fault := writeDisk(file, req.Name, fb.CapacityKb*1024, thin, fb.AdapterType); fault != nil {
			return nil, fault
		}
		diskProfiles.set(req.Name, profileIDs(fb.Profile))
		return req.Name, nil
	})
	return &methods.CreateVirtualDisk_TaskBody{
		Res: &types.CreateVirtualDisk_TaskResponse{Returnval: task.Run()},
	}
}

// copySparse copies src's bytes to a new file dst, leaving holes where src
// reads as zeros, and gives dst src's size.
func copySparse(src, dst string) error {
	r, err := os.Open(src)
	if err != nil {
		return err
	}
	defer r.Close()
	w, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0600)
	if err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	var off int64
	for err == nil {
		var n int
		n, err = io.ReadFull(r, buf)
		if n > 0 {
			for _, b := range buf[:n] {
				if b != 0 {
					if _, werr := w.WriteAt(buf[:n], off); werr != nil {
						err = werr
					}
					break
				}
			}
			off += int64(n)
		}
	}
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		err = w.Truncate(off)
	}
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(dst)
	}
	return err
}

// CopyVirtualDiskTask copies the descriptor and its flat extent; the copy
// gets a new ddb.uuid and names its own extent, as ESXi's copy does.
func (m *esxiDiskManager) CopyVirtualDiskTask(_ *simulator.Context, req *types.CopyVirtualDisk_Task) soap.HasFault {
	task := simulator.CreateTask(m, "copyVirtualDisk", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		if req.DestSpec != nil && simulator.Map.IsVPX() {
			return nil, new(types.NotImplemented) // as the simulator answers
		}
		src, fault := resolve(req.SourceDatacenter, req.SourceName)
		if fault != nil {
			return nil, fault
		}
		dst, fault := resolve(req.DestDatacenter, req.DestName)
		if fault != nil {
			return nil, fault
		}
		d, err := readDescriptor(src)
		if err != nil {
			return nil, fileFault(req.SourceName, err, new(types.CannotAccessFile))
		}
		if req.Force != nil && *req.Force {
			os.Remove(dst)
			os.Remove(flatName(dst))
		}
		// A new descriptor with a new uuid, and an empty extent of the same
		// size that the copy then fills.
		if fault := writeDisk(dst, req.DestName, d.sectors*512, d.thin, d.adapter); fault != nil {
			return nil, fault
		}
		os.Remove(flatName(dst))
		if err := copySparse(flatName(src), flatName(dst)); err != nil {
			os.Remove(dst)
			return nil, fileFault(flatName(req.SourceName), err, new(types.CannotAccessFile))
		}
		return nil, nil
	})
	return &methods.CopyVirtualDisk_TaskBody{
		Res: &types.CopyVirtualDisk_TaskResponse{Returnval: task.Run()},
	}
}

// backingUUIDs is a registry handler that gives every FlatVer2-backed disk
// of a VM whose descriptor has a ddb.uuid the backing uuid ESXi reports,
// and its capacity, whenever the VM's devices change.
type backingUUIDs struct{}

func (backingUUIDs) Reference() types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "VmdkTestsBackingUuids", Value: "backing-uuids"}
}

func (backingUUIDs) PutObject(mo.Reference) {}

func (backingUUIDs) RemoveObject(types.ManagedObjectReference) {}

// UpdateObject runs inside Map.Update, with the VM locked by the call
// that changes it.
func (backingUUIDs) UpdateObject(obj mo.Reference, changes []types.PropertyChange) {
	vm, ok := obj.(*mo.VirtualMachine)
	if !ok || vm.Config == nil {
		return
	}
	touched := false
	for _, c := range changes {
		touched = touched || c.Name == "config.hardware.device"
	}
	if !touched {
		return
	}
	for _, dev := range vm.Config.Hardware.Device {
		disk, ok := dev.(*types.VirtualDisk)
		if !ok {
			continue
		}
		b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok || b.Uuid != "" || b.Datastore == nil {
			continue
		}
		ds, ok := simulator.Map.Get(*b.Datastore).(*simulator.Datastore)
		var p object.DatastorePath
		if !ok || !p.FromString(b.FileName) {
			continue
		}
		dir := path.Clean(ds.Info.GetDatastoreInfo().Url)
		file := path.Join(dir, p.Path)
		if !strings.HasPrefix(file, dir+"/") {
			continue
		}
		d, err := readDescriptor(file)
		hex := strings.NewReplacer(" ", "", "-", "").Replace(d.uuid)
		if err != nil || len(hex) != 32 {
			continue // the simulator's own empty disks: no uuid, as before
		}
		b.Uuid = hex[:8] + "-" + hex[8:12] + "-" + hex[12:16] + "-" + hex[16:20] + "-" + hex[20:]
		if disk.CapacityInKB == 0 {
			disk.CapacityInBytes = d.sectors * 512
			disk.CapacityInKB = disk.CapacityInBytes / 1024
		}
	}
}

// ---------------------------------------------------------------------------
// Storage profiles of disks (vCenter)
//
// vcsim 0.24.2 accepts an SPBM profile on CreateVirtualDisk_Task and in a
// ReconfigVM_Task device change and forgets it, and its
// PbmQueryAssociatedProfile always answers nothing. vCenter keeps a disk's
// profile and answers it. So that a test can read a disk's profile back
// through the PBM API (pyvmomi, tests/vcsim/inspect.py), this simulator
// keeps, per disk file, the profile ids it was last given:
//
//   - by CreateVirtualDisk_Task (spec.profile), in the override above;
//   - by a ReconfigVM_Task device change with `operation` add or edit and a
//     `profile` (read from the request body by wrapSDK, which wraps the
//     server's handler, and kept only when the task succeeded);
//
// and answers PbmQueryAssociatedProfile for `virtualDiskId` entities
// ("<vm moref>:<device key>", as vCenter names a VM's disk) from the file
// that device is backed by. Like vCenter, and unlike vcsim, PbmCreate
// refuses a name that a profile already has (PbmDuplicateName).

// profileStore maps a disk's datastore path ("[ds] path") to its profile ids.
type profileStore struct {
	sync.Mutex
	byFile map[string][]string
}

var diskProfiles = &profileStore{byFile: map[string][]string{}}

func (p *profileStore) set(file string, ids []string) {
	p.Lock()
	defer p.Unlock()
	if len(ids) == 0 {
		delete(p.byFile, file)
	} else {
		p.byFile[file] = ids
	}
}

func (p *profileStore) get(file string) []string {
	p.Lock()
	defer p.Unlock()
	return append([]string(nil), p.byFile[file]...)
}

// profileIDs are the ids of VirtualMachineDefinedProfileSpecs.
func profileIDs(specs []types.BaseVirtualMachineProfileSpec) []string {
	var ids []string
	for _, s := range specs {
		if d, ok := s.(*types.VirtualMachineDefinedProfileSpec); ok && d.ProfileId != "" {
			ids = append(ids, d.ProfileId)
		}
	}
	return ids
}

// pbmProfiles is the PBM simulator's ProfileManager with vCenter's answers
// to PbmCreate (unique names) and PbmQueryAssociatedProfile (see above).
type pbmProfiles struct {
	pbmsim.ProfileManager
}

// installPBM serves PBM at /pbm (vCenter only) with pbmProfiles; call it
// instead of setting Service.RegisterEndpoints.
func installPBM(s *simulator.Service) {
	if !simulator.Map.IsVPX() {
		return
	}
	r := pbmsim.New()
	ref := types.ManagedObjectReference{Type: "PbmProfileProfileManager", Value: "ProfileManager"}
	orig := r.Get(ref).(*pbmsim.ProfileManager)
	r.Put(&pbmProfiles{*orig})
	s.RegisterSDK(r)
}

func (m *pbmProfiles) PbmCreate(ctx *simulator.Context, req *pbmtypes.PbmCreate) soap.HasFault {
	all := m.PbmQueryProfile(&pbmtypes.PbmQueryProfile{
		ResourceType: pbmtypes.PbmProfileResourceType{ResourceType: string(pbmtypes.PbmProfileResourceTypeEnumSTORAGE)},
	}).(*pbmmethods.PbmQueryProfileBody)
	if len(all.Res.Returnval) > 0 {
		content := m.PbmRetrieveContent(&pbmtypes.PbmRetrieveContent{ProfileIds: all.Res.Returnval}).(*pbmmethods.PbmRetrieveContentBody)
		if content.Res != nil {
			for _, p := range content.Res.Returnval {
				if p.GetPbmProfile().Name == req.CreateSpec.Name {
					return &pbmmethods.PbmCreateBody{
						Fault_: simulator.Fault("", &pbmtypes.PbmDuplicateName{Name: req.CreateSpec.Name}),
					}
				}
			}
		}
	}
	return m.ProfileManager.PbmCreate(ctx, req)
}

func (m *pbmProfiles) PbmQueryAssociatedProfile(req *pbmtypes.PbmQueryAssociatedProfile) soap.HasFault {
	body := &pbmmethods.PbmQueryAssociatedProfileBody{Res: new(pbmtypes.PbmQueryAssociatedProfileResponse)}
	if req.Entity.ObjectType != string(pbmtypes.PbmObjectTypeVirtualDiskId) {
		return body
	}
	vmRef, key, ok := strings.Cut(req.Entity.Key, ":")
	device, err := strconv.Atoi(key)
	if !ok || err != nil {
		body.Fault_ = simulator.Fault("", &types.InvalidArgument{InvalidProperty: "entity.key"})
		return body
	}
	vm, ok := simulator.Map.Get(types.ManagedObjectReference{Type: "VirtualMachine", Value: vmRef}).(*simulator.VirtualMachine)
	if !ok {
		body.Fault_ = simulator.Fault("", &types.ManagedObjectNotFound{Obj: types.ManagedObjectReference{Type: "VirtualMachine", Value: vmRef}})
		return body
	}
	simulator.Map.WithLock(vm, func() {
		for _, dev := range vm.Config.Hardware.Device {
			disk, ok := dev.(*types.VirtualDisk)
			if !ok || disk.Key != int32(device) {
				continue
			}
			if b, ok := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo); ok {
				for _, id := range diskProfiles.get(b.GetVirtualDeviceFileBackingInfo().FileName) {
					body.Res.Returnval = append(body.Res.Returnval, pbmtypes.PbmProfileId{UniqueId: id})
				}
			}
		}
	})
	return body
}

// reconfigRequest is what recordDeviceProfiles reads of a ReconfigVM_Task
// request (element names match in any namespace).
type reconfigRequest struct {
	Body struct {
		Reconfig *struct {
			Spec struct {
				DeviceChange []struct {
					Operation string `xml:"operation"`
					Device    struct {
						Backing struct {
							FileName string `xml:"fileName"`
						} `xml:"backing"`
					} `xml:"device"`
					Profile []struct {
						ProfileID string `xml:"profileId"`
					} `xml:"profile"`
				} `xml:"deviceChange"`
			} `xml:"spec"`
		} `xml:"ReconfigVM_Task"`
	} `xml:"Body"`
}

// taskResponse is the task a ReconfigVM_Task response names.
type taskResponse struct {
	Body struct {
		Response *struct {
			Returnval string `xml:"returnval"`
		} `xml:"ReconfigVM_TaskResponse"`
	} `xml:"Body"`
}

// heldResponse keeps a whole response (headers, status, body) until it is
// sent with send.
type heldResponse struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (h *heldResponse) Header() http.Header { return h.header }

func (h *heldResponse) WriteHeader(code int) { h.status = code }

func (h *heldResponse) Write(p []byte) (int, error) { return h.body.Write(p) }

func (h *heldResponse) send(w http.ResponseWriter) {
	for k, v := range h.header {
		w.Header()[k] = v
	}
	w.WriteHeader(h.status)
	_, _ = w.Write(h.body.Bytes())
}

// soapMethod is the first of `methods` whose element a request body holds.
func soapMethod(body []byte, methods map[string]int) (string, bool) {
	for m := range methods {
		if bytes.Contains(body, []byte("<"+m+">")) || bytes.Contains(body, []byte("<"+m+" ")) {
			return m, true
		}
	}
	return "", false
}

// wrapSDK wraps the SOAP handler:
//
//   - a ReconfigVM_Task whose task succeeded records the profiles its device
//     changes gave disks (see diskProfiles);
//   - a call to a method in `stalls` is carried out, then "vcsim: executed
//     METHOD" is written to stderr and the response held back for the
//     method's milliseconds (-response-delay), so a test can kill the
//     simulator after the work is done and before the client knows.
func wrapSDK(next http.Handler, stalls map[string]int) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path != "/sdk" {
			next.ServeHTTP(w, r)
			return
		}
		raw, err := io.ReadAll(io.LimitReader(r.Body, 64<<20))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(raw))
		resp := &heldResponse{header: http.Header{}, status: http.StatusOK}
		next.ServeHTTP(resp, r)
		if bytes.Contains(raw, []byte("ReconfigVM_Task")) {
			recordDeviceProfiles(raw, resp)
		}
		if m, ok := soapMethod(raw, stalls); ok {
			fmt.Fprintf(os.Stderr, "vcsim: executed %s\n", m)
			time.Sleep(time.Duration(stalls[m]) * time.Millisecond)
		}
		resp.send(w)
	})
}

// recordDeviceProfiles records the profiles a successful ReconfigVM_Task
// gave disks.
func recordDeviceProfiles(raw []byte, resp *heldResponse) {
	var req reconfigRequest
	if xml.Unmarshal(raw, &req) != nil || req.Body.Reconfig == nil {
		return
	}
	var task taskResponse
	if resp.status != http.StatusOK || xml.Unmarshal(resp.body.Bytes(), &task) != nil || task.Body.Response == nil {
		return
	}
	t, ok := simulator.Map.Get(types.ManagedObjectReference{Type: "Task", Value: strings.TrimSpace(task.Body.Response.Returnval)}).(*simulator.Task)
	if !ok {
		return
	}
	succeeded := false
	simulator.Map.WithLock(t, func() { succeeded = t.Info.State == types.TaskInfoStateSuccess })
	if !succeeded {
		return
	}
	for _, c := range req.Body.Reconfig.Spec.DeviceChange {
		if (c.Operation != "add" && c.Operation != "edit") || len(c.Profile) == 0 || c.Device.Backing.FileName == "" {
			continue
		}
		var ids []string
		for _, p := range c.Profile {
			ids = append(ids, strings.TrimSpace(p.ProfileID))
		}
		diskProfiles.set(c.Device.Backing.FileName, ids)
	}
}

// ---------------------------------------------------------------------------
// A simulator that can be killed and started again
//
// With -state-dir, the datastores are directories under it (kept when the
// simulator exits) and the TLS certificates are kept there too, so a
// simulator started again with the same -state-dir and -listen port is, to
// a client, the same server with the same files (its inventory, being the
// same model, has the same VMs with the same UUIDs; what was changed in
// memory, such as devices added to a VM, is gone, as after a vCenter that
// lost its database).

// tlsState is the certificates kept in <state-dir>/tls.json.
type tlsState struct {
	Cert []byte `json:"cert"`
	Key  []byte `json:"key"`
	CA   []byte `json:"ca"`
}

// stateCertificates loads the certificates kept in dir, or makes them and
// keeps them there.
func stateCertificates(dir string) (tls.Certificate, []byte, []byte, error) {
	file := filepath.Join(dir, "tls.json")
	if raw, err := os.ReadFile(file); err == nil {
		var st tlsState
		if err := json.Unmarshal(raw, &st); err != nil {
			return tls.Certificate{}, nil, nil, fmt.Errorf("%s: %w", file, err)
		}
		key, err := x509.ParsePKCS1PrivateKey(st.Key)
		if err != nil {
			return tls.Certificate{}, nil, nil, fmt.Errorf("%s: %w", file, err)
		}
		return tls.Certificate{Certificate: [][]byte{st.Cert}, PrivateKey: key}, st.Cert, st.CA, nil
	}
	cert, der, ca, err := certificates()
	if err != nil {
		return cert, der, ca, err
	}
	st := tlsState{Cert: der, Key: x509.MarshalPKCS1PrivateKey(cert.PrivateKey.(*rsa.PrivateKey)), CA: ca}
	raw, err := json.Marshal(st)
	if err == nil {
		err = os.WriteFile(file, raw, 0600)
	}
	return cert, der, ca, err
}

// stateDatastores moves every datastore to <dir>/ds-<name>: the first time,
// the model's files are moved there; later, the files there are used as
// they are.
func stateDatastores(dir string) error {
	for _, e := range simulator.Map.All("Datastore") {
		ds := e.(*simulator.Datastore)
		info := ds.Info.GetDatastoreInfo()
		kept := filepath.Join(dir, "ds-"+ds.Name)
		if _, err := os.Stat(kept); os.IsNotExist(err) {
			if err := os.Rename(info.Url, kept); err != nil {
				return err
			}
			if err := os.Mkdir(info.Url, 0700); err != nil { // model.Remove removes it
				return err
			}
		} else if err != nil {
			return err
		}
		info.Url = kept
		ds.Summary.Url = kept
	}
	return nil
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on (port 0 picks a free port)")
	esx := flag.Bool("esx", false, "simulate a standalone ESX host (default: vCenter, VPX)")
	username := flag.String("username", "", "only this user name logs in (default: any non-empty name and password)")
	password := flag.String("password", "", "only this password logs in (with -username)")
	vms := flag.Int("vms", 2, "virtual machines per host or resource pool")
	ds := flag.Int("ds", 1, "number of datastores")
	dc := flag.Int("dc", 1, "number of datacenters (VPX only)")
	delay := flag.String("method-delay", "", "per-method delays, Method:milliseconds[,Method:milliseconds]")
	impostor := flag.Bool("impostor", false, "present the certificate but sign the TLS handshake with another key (a server replaying a pinned certificate it has no key for)")
	announce := flag.String("announce", "", "methods whose arrival is written to stderr as \"vcsim: received METHOD\" (comma-separated), before any -method-delay")
	responseDelay := flag.String("response-delay", "", "per-method delays after the call was carried out, Method:milliseconds[,...]; \"vcsim: executed METHOD\" is written to stderr when the delay starts")
	vsan := flag.Int("vsan", 0, "the first N datastores (by name) report summary.type vsan")
	stateDir := flag.String("state-dir", "", "keep the datastores and the TLS certificates in this directory, so a simulator started again with it (and the same -listen) serves the same files")
	flag.Parse()
	log.SetPrefix("vcsim: ")
	log.SetFlags(0)

	if (*username == "") != (*password == "") {
		log.Fatal("-username and -password go together")
	}
	delays, err := methodDelays(*delay)
	if err != nil {
		log.Fatal(err)
	}
	stalls, err := methodDelays(*responseDelay)
	if err != nil {
		log.Fatal(strings.Replace(err.Error(), "-method-delay", "-response-delay", 1))
	}

	var model *simulator.Model
	name := "VPX"
	if *esx {
		model = simulator.ESX()
		name = "ESX"
	} else {
		model = simulator.VPX()
		model.Datacenter = *dc
	}
	model.Machine = *vms
	model.Datastore = *ds
	model.DelayConfig.MethodDelay = delays
	if *announce != "" {
		if err := announceRequests(strings.Split(*announce, ",")); err != nil {
			log.Fatalf("-announce: %s", err)
		}
	}

	if err := model.Create(); err != nil {
		log.Fatalf("creating the model: %s", err)
	}
	installESXiDisks()
	// Everything from here on must remove the model's temporary datastores.
	fail := func(format string, args ...interface{}) {
		model.Remove()
		log.Fatalf(format, args...)
	}

	names := []*simulator.Datastore{}
	for _, e := range simulator.Map.All("Datastore") {
		names = append(names, e.(*simulator.Datastore))
	}
	sort.Slice(names, func(i, j int) bool { return names[i].Name < names[j].Name })
	for i := 0; i < *vsan && i < len(names); i++ {
		names[i].Summary.Type = "vsan"
	}

	var cert tls.Certificate
	var der, caDER []byte
	if *stateDir != "" {
		if err := stateDatastores(*stateDir); err != nil {
			fail("-state-dir: %s", err)
		}
		cert, der, caDER, err = stateCertificates(*stateDir)
	} else {
		cert, der, caDER, err = certificates()
	}
	if err != nil {
		fail("generating a certificate: %s", err)
	}
	if *impostor {
		other, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			fail("generating a key: %s", err)
		}
		cert.PrivateKey = other
	}
	model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	installPBM(model.Service) // PBM at /pbm (VPX only)
	model.Service.Listen = &url.URL{Host: *listen}
	if *username != "" {
		model.Service.Listen.User = url.UserPassword(*username, *password)
	}
	server := model.Service.NewServer()
	// No client knows the address before the inventory line below, so no
	// request is being served while the handler is wrapped.
	server.Config.Handler = wrapSDK(server.Config.Handler, stalls)

	user := server.URL.User.Username()
	pass, _ := server.URL.User.Password()
	u := *server.URL
	u.User = nil

	sha256sum := sha256.Sum256(der)
	sha1sum := sha1.Sum(der)
	out := info{
		URL:              u.String(),
		Model:            name,
		Username:         user,
		Password:         pass,
		ThumbprintSHA256: fingerprint(sha256sum[:]),
		ThumbprintSHA1:   fingerprint(sha1sum[:]),
		CertPEM:          string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})),
		CAPEM:            string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})),
		Datacenters:      []string{},
		Datastores:       []datastore{},
		VMs:              []vm{},
		Pid:              os.Getpid(),
	}
	for _, e := range simulator.Map.All("Datacenter") {
		out.Datacenters = append(out.Datacenters, e.Entity().Name)
	}
	sort.Strings(out.Datacenters)
	if len(out.Datacenters) > 0 {
		out.Datacenter = out.Datacenters[0]
	}
	for _, e := range simulator.Map.All("Datastore") {
		d := e.(*simulator.Datastore)
		out.Datastores = append(out.Datastores, datastore{
			Name:  d.Name,
			Moref: d.Self.Value,
			Path:  d.Info.GetDatastoreInfo().Url,
		})
	}
	sort.Slice(out.Datastores, func(i, j int) bool { return out.Datastores[i].Name < out.Datastores[j].Name })
	for _, e := range simulator.Map.All("VirtualMachine") {
		v := e.(*simulator.VirtualMachine)
		host := ""
		if v.Runtime.Host != nil {
			host = v.Runtime.Host.Value
		}
		out.VMs = append(out.VMs, vm{Name: v.Name, Moref: v.Self.Value, UUID: v.Config.Uuid, Host: host})
	}
	sort.Slice(out.VMs, func(i, j int) bool { return out.VMs[i].Name < out.VMs[j].Name })

	line, err := json.Marshal(out)
	if err != nil {
		server.Close()
		fail("encoding the inventory: %s", err)
	}
	if _, err := os.Stdout.Write(append(line, '\n')); err != nil {
		server.Close()
		fail("writing the inventory: %s", err)
	}

	done := make(chan string, 2)
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() { done <- (<-signals).String() }()
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		done <- "stdin closed"
	}()
	why := <-done
	server.Close()
	model.Remove()
	log.Printf("stopped (%s)", why)
}

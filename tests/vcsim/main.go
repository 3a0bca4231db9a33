// Command vcsim runs govmomi's vSphere simulator (Debian's
// golang-github-vmware-govmomi-dev 0.24.2) for the vSphere client's tests.
//
// It serves TLS with a freshly generated RSA-2048 self-signed certificate
// (govmomi's built-in test certificate is RSA-1024, which rustls refuses),
// prints one JSON line describing the inventory on stdout, and exits cleanly,
// deleting its temporary datastores, on SIGTERM, SIGINT or when stdin closes.
//
// Build in GOPATH mode (see tests/vcsim/build.sh):
//
//	GO111MODULE=off GOPROXY=off GOPATH=<dir>:/usr/share/gocode go build
package main

import (
	"bufio"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	_ "github.com/vmware/govmomi/pbm/simulator"
	"github.com/vmware/govmomi/simulator"
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
	// Everything from here on must remove the model's temporary datastores.
	fail := func(format string, args ...interface{}) {
		model.Remove()
		log.Fatalf(format, args...)
	}

	cert, der, caDER, err := certificates()
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
	model.Service.RegisterEndpoints = true // PBM at /pbm (VPX only)
	model.Service.Listen = &url.URL{Host: *listen}
	if *username != "" {
		model.Service.Listen.User = url.UserPassword(*username, *password)
	}
	server := model.Service.NewServer()

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

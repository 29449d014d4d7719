// Package controlplane runs a real Kubernetes control plane for the lab:
// Debian's etcd, and kube-apiserver and kube-controller-manager built from
// the Go module proxy (tools/k8s). It runs in a network namespace of its
// own on the lab's underlay, as a control-plane node would; agents reach it
// over the underlay and in-process clients dial into its namespace.
package controlplane

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/weirnet/weir/core/netns"
	"github.com/weirnet/weir/core/proc"
)

// Version is the Kubernetes version tools/k8s builds.
const Version = "v1.34.4"

// Options configure a control plane.
type Options struct {
	// BinDir holds kube-apiserver and kube-controller-manager; empty asks
	// FindBinaries.
	BinDir string
	// Etcd is the etcd binary (default: etcd on PATH).
	Etcd string
	// Dir receives data, certificates, kubeconfigs and logs.
	Dir string
	// Netns is the path of the namespace to run in.
	Netns string
	// Address is the API server's address in that namespace.
	Address netip.Addr
	// ServiceCIDR is the service cluster IP range (default 10.96.0.0/16).
	ServiceCIDR string
}

// ControlPlane is a running control plane. Its JSON form is what another
// process needs to use or stop it.
type ControlPlane struct {
	Dir     string `json:"dir"`
	Netns   string `json:"netns"`
	URL     string `json:"url"`
	Token   string `json:"token"`
	CAFile  string `json:"caFile"`
	PIDs    []int  `json:"pids"`
	Version string `json:"version"`
}

// FindBinaries returns the directory of the control-plane binaries: the
// WEIR_K8S_BIN environment variable, or the build cache of tools/k8s
// (~/.cache/weir/k8s-<version>).
func FindBinaries() (string, error) {
	if d := os.Getenv("WEIR_K8S_BIN"); d != "" {
		return d, nil
	}
	cache := os.Getenv("WEIR_CACHE")
	if cache == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", err
		}
		cache = filepath.Join(home, ".cache", "weir")
	}
	d := filepath.Join(cache, "k8s-"+Version)
	for _, b := range []string{"kube-apiserver", "kube-controller-manager"} {
		if _, err := os.Stat(filepath.Join(d, b)); err != nil {
			return "", fmt.Errorf("%s not found in %s: build it with tools/k8s/build.sh (make k8s)", b, d)
		}
	}
	return d, nil
}

// Start brings the control plane up and waits until the API server is
// ready. On failure everything started is stopped.
func Start(ctx context.Context, o Options) (cp *ControlPlane, err error) {
	if o.BinDir == "" {
		if o.BinDir, err = FindBinaries(); err != nil {
			return nil, err
		}
	}
	if o.Etcd == "" {
		if o.Etcd, err = exec.LookPath("etcd"); err != nil {
			return nil, errors.New("etcd not found: install Debian's etcd-server")
		}
	}
	if o.ServiceCIDR == "" {
		o.ServiceCIDR = "10.96.0.0/16"
	}
	if err := os.MkdirAll(o.Dir, 0o700); err != nil {
		return nil, err
	}
	cp = &ControlPlane{Dir: o.Dir, Netns: o.Netns, Version: Version,
		URL: "https://" + net.JoinHostPort(o.Address.String(), "6443"), CAFile: filepath.Join(o.Dir, "ca.crt")}
	defer func() {
		if err != nil {
			cp.Stop()
			cp = nil
		}
	}()
	if err := cp.writePKI(o); err != nil {
		return cp, fmt.Errorf("writing certificates: %w", err)
	}
	run := func(name, bin string, args ...string) error {
		pid, err := proc.Start(proc.Spec{Path: bin, Args: args, Netns: o.Netns, LogFile: filepath.Join(o.Dir, name+".log")})
		if err != nil {
			return err
		}
		cp.PIDs = append(cp.PIDs, pid)
		return nil
	}
	d := func(f string) string { return filepath.Join(o.Dir, f) }
	if err := run("etcd", o.Etcd,
		"--name", "lab", "--data-dir", d("etcd"),
		"--listen-client-urls", "http://127.0.0.1:2379", "--advertise-client-urls", "http://127.0.0.1:2379",
		"--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
		"--initial-cluster", "lab=http://127.0.0.1:2380", "--log-level", "warn",
	); err != nil {
		return cp, err
	}
	if err := run("kube-apiserver", filepath.Join(o.BinDir, "kube-apiserver"),
		"--etcd-servers=http://127.0.0.1:2379",
		"--bind-address=0.0.0.0", "--secure-port=6443", "--advertise-address="+o.Address.String(),
		"--tls-cert-file="+d("apiserver.crt"), "--tls-private-key-file="+d("apiserver.key"),
		"--token-auth-file="+d("tokens.csv"), "--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+d("sa.pub"), "--service-account-signing-key-file="+d("sa.key"),
		"--service-cluster-ip-range="+o.ServiceCIDR,
		// No service account tokens are mounted in lab pods.
		"--disable-admission-plugins=ServiceAccount",
		"--enable-priority-and-fairness=false", "--profiling=false", "--allow-privileged=true",
	); err != nil {
		return cp, err
	}
	if err := cp.waitReady(ctx, filepath.Join(o.Dir, "kube-apiserver.log")); err != nil {
		return cp, err
	}
	if err := cp.WriteKubeconfig(d("controller-manager.kubeconfig"), "https://127.0.0.1:6443"); err != nil {
		return cp, err
	}
	if err := run("kube-controller-manager", filepath.Join(o.BinDir, "kube-controller-manager"),
		"--kubeconfig="+d("controller-manager.kubeconfig"),
		// The EndpointSlice controller turns pods into slices; namespace
		// deletion needs the namespace controller.
		"--controllers=endpointslice,endpointslicemirroring,namespace",
		"--leader-elect=false", "--use-service-account-credentials=false",
		"--bind-address=127.0.0.1", "--profiling=false",
	); err != nil {
		return cp, err
	}
	if err := cp.save(); err != nil {
		return cp, err
	}
	return cp, nil
}

func (cp *ControlPlane) save() error {
	data, err := json.MarshalIndent(cp, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(cp.Dir, "controlplane.json"), data, 0o600)
}

// Load reads a running control plane's description from its directory.
func Load(dir string) (*ControlPlane, error) {
	data, err := os.ReadFile(filepath.Join(dir, "controlplane.json"))
	if err != nil {
		return nil, err
	}
	var cp ControlPlane
	if err := json.Unmarshal(data, &cp); err != nil {
		return nil, err
	}
	return &cp, nil
}

// Stop stops every component (newest first) and removes the directory.
func (cp *ControlPlane) Stop() error {
	for i := len(cp.PIDs) - 1; i >= 0; i-- {
		proc.Stop(cp.PIDs[i], "", 10*time.Second)
	}
	cp.PIDs = nil
	return os.RemoveAll(cp.Dir)
}

func (cp *ControlPlane) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	if cp.Netns == "" {
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}
	return netns.Dial(ctx, cp.Netns, network, addr)
}

// RestConfig returns a client configuration for in-process clients, which
// dial into the control plane's namespace.
func (cp *ControlPlane) RestConfig() *rest.Config {
	return &rest.Config{
		Host:            cp.URL,
		BearerToken:     cp.Token,
		TLSClientConfig: rest.TLSClientConfig{CAFile: cp.CAFile},
		Dial:            cp.dial,
		QPS:             200,
		Burst:           400,
	}
}

// WriteKubeconfig writes a kubeconfig for clients that reach server (the
// API server's URL as they see it) directly, such as agents on the underlay.
func (cp *ControlPlane) WriteKubeconfig(path, server string) error {
	return cp.WriteKubeconfigAs(path, server, "admin", cp.Token)
}

// WriteKubeconfigAs writes a kubeconfig for clients that reach server with
// another bearer token (a service account's).
func (cp *ControlPlane) WriteKubeconfigAs(path, server, user, token string) error {
	ca, err := os.ReadFile(cp.CAFile)
	if err != nil {
		return err
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["lab"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: ca}
	cfg.AuthInfos[user] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts["lab"] = &clientcmdapi.Context{Cluster: "lab", AuthInfo: user}
	cfg.CurrentContext = "lab"
	return clientcmd.WriteToFile(*cfg, path)
}

func (cp *ControlPlane) waitReady(ctx context.Context, log string) error {
	ca, err := os.ReadFile(cp.CAFile)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DialContext:     cp.dial,
		TLSClientConfig: &tls.Config{RootCAs: pool},
	}}
	ctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	var last error
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, cp.URL+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+cp.Token)
		resp, err := c.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("readyz: HTTP %d", resp.StatusCode)
		}
		last = err
		for _, pid := range cp.PIDs {
			if !proc.Alive(pid) {
				return fmt.Errorf("a control-plane process exited; kube-apiserver log:\n%s", proc.Tail(log, 20))
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("kube-apiserver not ready (%v); log:\n%s", last, proc.Tail(log, 20))
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// writePKI makes a CA, the API server's serving certificate, the service
// account signing key, and the static token of the lab's admin.
func (cp *ControlPlane) writePKI(o Options) error {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "weir-lab-ca"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(10 * 365 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	_, svcNet, err := net.ParseCIDR(o.ServiceCIDR)
	if err != nil {
		return fmt.Errorf("service CIDR %q: %w", o.ServiceCIDR, err)
	}
	firstSvc := make(net.IP, 4)
	copy(firstSvc, svcNet.IP.To4())
	firstSvc[3]++
	srvTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "kube-apiserver"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{o.Address.AsSlice(), firstSvc, net.IPv4(127, 0, 0, 1)},
		DNSNames:    []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, caCert, &srvKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	var tok [16]byte
	if _, err := rand.Read(tok[:]); err != nil {
		return err
	}
	cp.Token = hex.EncodeToString(tok[:])
	srvKeyPEM, err := keyPEM(srvKey)
	if err != nil {
		return err
	}
	saKeyPEM, err := keyPEM(saKey)
	if err != nil {
		return err
	}
	saPub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return err
	}
	files := map[string][]byte{
		"ca.crt":        pemBlock("CERTIFICATE", caDER),
		"apiserver.crt": pemBlock("CERTIFICATE", srvDER),
		"apiserver.key": srvKeyPEM,
		"sa.key":        saKeyPEM,
		"sa.pub":        pemBlock("PUBLIC KEY", saPub),
		"tokens.csv":    []byte(cp.Token + ",admin,admin,system:masters\n"),
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(o.Dir, name), data, 0o600); err != nil {
			return err
		}
	}
	return nil
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func keyPEM(k *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, err
	}
	return pemBlock("PRIVATE KEY", der), nil
}

// Describe is a one-line summary for status output.
func (cp *ControlPlane) Describe() string {
	alive := 0
	for _, p := range cp.PIDs {
		if proc.Alive(p) {
			alive++
		}
	}
	return fmt.Sprintf("Kubernetes %s at %s (%d of %d processes running)", cp.Version, strings.TrimPrefix(cp.URL, "https://"), alive, len(cp.PIDs))
}

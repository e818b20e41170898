// Command coredns is CoreDNS with only the plugins the e2e cluster needs, so
// that a cold build compiles a fraction of the full plugin set. It serves the
// cluster.local zone from the API server (the kubernetes plugin), which is what
// kube-dns/CoreDNS does in any real cluster.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// Order matters: it is the order in which CoreDNS chains the plugins
// (a subset of upstream's plugin.cfg, in upstream's order).
var directives = []string{"bind", "ready", "health", "errors", "log", "cache", "kubernetes"}

func init() { dnsserver.Directives = directives }

func main() { coremain.Run() }

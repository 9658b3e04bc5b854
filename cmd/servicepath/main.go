// Command servicepath loads the eBPF datapath, programs Kubernetes
// Services into it from manifests, and shows what it holds.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
)

const defaultBPFFS = "/sys/fs/bpf/servicepath"

// output is where a command writes: results to out, diagnostics to errOut.
type output struct{ out, errOut io.Writer }

type command struct {
	name    string
	summary string
	run     func(args []string, o output) error
}

var commands = []command{
	{"load", "load the datapath, pin its maps, attach to pod devices", cmdLoad},
	{"unload", "detach everything and remove the pinned maps", cmdUnload},
	{"cleanup", "remove servicepath (and with --kube-proxy, kube-proxy's rules) before a migration or uninstall", cmdCleanup},
	{"apply", "program Services and EndpointSlices from manifests", cmdApply},
	{"delete", "remove the Services named in manifests", cmdDelete},
	{"services", "list programmed frontends and backends", cmdServices},
	{"ct", "list connection tracking entries", cmdCT},
	{"stats", "show datapath counters and map occupancy", cmdStats},
	{"gc", "delete expired connection tracking entries", cmdGC},
	{"agent", "program the Services of a Kubernetes cluster as it changes", cmdAgent},
}

func usage(w io.Writer) {
	fmt.Fprintf(w, "usage: servicepath COMMAND [flags]\n\ncommands:\n")
	for _, c := range commands {
		fmt.Fprintf(w, "  %-9s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(w, "\n`servicepath COMMAND -h` lists a command's flags.\n")
}

// errUsage marks errors already explained by a flag set's usage output.
var errUsage = errors.New("usage")

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stdout)
		return 0
	}
	for _, c := range commands {
		if c.name == args[0] {
			err := c.run(args[1:], output{stdout, stderr})
			switch {
			case err == nil:
				return 0
			case errors.Is(err, flag.ErrHelp):
				return 0
			case errors.Is(err, errUsage):
				return 2
			}
			fmt.Fprintf(stderr, "servicepath %s: %v\n", c.name, err)
			return 1
		}
	}
	fmt.Fprintf(stderr, "servicepath: unknown command %q\n", args[0])
	usage(stderr)
	return 2
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// stringList is a repeatable flag that also splits on commas.
type stringList []string

func (s *stringList) String() string { return strings.Join(*s, ",") }

func (s *stringList) Set(v string) error {
	for _, p := range strings.Split(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			*s = append(*s, p)
		}
	}
	return nil
}

func newFlags(name string, o output) *flag.FlagSet {
	fs := flag.NewFlagSet("servicepath "+name, flag.ContinueOnError)
	fs.SetOutput(o.errOut)
	return fs
}

// parse reports flag errors once, through the flag set's own message.
func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "unexpected argument %q\n", fs.Arg(0))
		fs.Usage()
		return errUsage
	}
	return nil
}

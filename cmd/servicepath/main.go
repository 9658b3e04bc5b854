// Command servicepath loads the eBPF datapath, programs Kubernetes
// Services into it from manifests, and shows what it holds.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

const defaultBPFFS = "/sys/fs/bpf/servicepath"

// output is where a command writes: results to out, diagnostics to errOut.
type output struct{ out, errOut io.Writer }

type command struct {
	name    string
	summary string
	// setup declares the command's flags on fs and returns what runs it
	// once they are parsed.
	setup func(fs *pflag.FlagSet, o output) func() error
}

var commands = []command{
	{"load", "load the datapath, pin its maps, attach to pod devices", cmdLoad},
	{"unload", "detach everything and remove the pinned maps", cmdUnload},
	{"cleanup", "remove servicepath (and with --kube-proxy, kube-proxy's rules) before a migration or uninstall", cmdCleanup},
	{"apply", "program Services and EndpointSlices from manifests", cmdApply},
	{"delete", "remove the Services named in manifests", cmdDelete},
	{"status", "summarise what is loaded, attached and programmed", cmdStatus},
	{"services", "list programmed frontends and backends", cmdServices},
	{"ct", "list connection tracking entries", cmdCT},
	{"stats", "show datapath counters and map occupancy", cmdStats},
	{"gc", "delete expired connection tracking entries", cmdGC},
	{"agent", "program the Services of a Kubernetes cluster as it changes", cmdAgent},
	{"version", "print the version this binary was built from", cmdVersion},
}

// usageError is a mistake in the command line: exit code 2.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, a ...any) error { return usageError{fmt.Errorf(format, a...)} }

// checked runs fn with a command's options once they pass their check,
// which cobra cannot do for flags that depend on each other.
func checked[T interface{ check() error }](opts T, fn func(T) error) func() error {
	return func() error {
		if err := opts.check(); err != nil {
			return err
		}
		return fn(opts)
	}
}

func noArgs(_ *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usagef("unexpected argument %q", args[0])
	}
	return nil
}

// newRoot is the command tree; cobra adds help and shell completion
// (`servicepath completion bash`).
func newRoot(o output) *cobra.Command {
	root := &cobra.Command{
		Use:           "servicepath",
		Short:         "Kubernetes Services in eBPF, in place of kube-proxy",
		SilenceUsage:  true,
		SilenceErrors: true,
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usagef("unknown command %q", args[0])
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	root.SetOut(o.out)
	root.SetErr(o.errOut)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	for _, c := range commands {
		cmd := &cobra.Command{Use: c.name, Short: c.summary, Args: noArgs}
		run := c.setup(cmd.Flags(), o)
		cmd.RunE = func(*cobra.Command, []string) error { return run() }
		root.AddCommand(cmd)
	}
	return root
}

func run(args []string, stdout, stderr io.Writer) int {
	root := newRoot(output{stdout, stderr})
	root.SetArgs(args)
	cmd, err := root.ExecuteC()
	if err == nil {
		return 0
	}
	name := "servicepath"
	if cmd != nil && cmd != root {
		name += " " + cmd.Name()
	}
	fmt.Fprintf(stderr, "%s: %v\n", name, err)
	if errors.As(err, new(usageError)) {
		fmt.Fprintf(stderr, "run '%s --help' for usage\n", name)
		return 2
	}
	return 1
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// stringList is a repeatable flag that also splits on commas.
type stringList []string

func (s *stringList) String() string { return strings.Join(*s, ",") }
func (s *stringList) Type() string   { return "strings" }

func (s *stringList) Set(v string) error {
	for _, p := range strings.Split(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			*s = append(*s, p)
		}
	}
	return nil
}

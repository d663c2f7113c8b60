// Command nomad is the Nomad agent and CLI, built from the upstream Go module
// so the driver's tests run against the real thing (the "test peer").
//
// Why v1.11.3 (pinned in go.mod):
//   - it is the newest github.com/hashicorp/nomad version the Go module proxy
//     serves here;
//   - 1.11.x is >= 1.10, so an external driver is only loaded when the agent
//     config has a `plugin "<file name>"` block for it;
//   - 1.11.x is < 2.0.4, so the agent never calls Driver.Init/Shutdown.
//
// This mirrors what Nomad's own main.go does, minus the grouped help text.
package main

import (
	// Imported for their init() funcs: when the agent re-executes itself as
	// a helper process (`nomad logmon`, `nomad executor`, `nomad
	// artifact-isolation`, `nomad template-render`, `nomad docker_logger`),
	// they see it in os.Args, run that helper and exit before main() starts.
	// Log collection and raw_exec/exec depend on logmon and executor.
	_ "github.com/hashicorp/nomad/client/allocrunner/taskrunner/getter"
	_ "github.com/hashicorp/nomad/client/allocrunner/taskrunner/template/renderer"
	_ "github.com/hashicorp/nomad/client/logmon"
	_ "github.com/hashicorp/nomad/drivers/docker/docklog"
	_ "github.com/hashicorp/nomad/drivers/shared/executor"

	"fmt"
	"os"

	"github.com/hashicorp/cli"
	"github.com/hashicorp/nomad/command"
	"github.com/hashicorp/nomad/version"
)

// Internal helper commands, hidden from help and autocomplete as upstream does.
var hidden = []string{
	"alloc-status", "check", "client-config", "debug", "docker_logger",
	"eval-status", "executor", "logmon", "node-drain", "node-status",
	"operator raft _info", "operator raft _logs", "operator raft _state",
	"operator snapshot _state", "server-force-leave", "server-join",
	"server-members", "syslog", "template-render",
}

func main() {
	args := os.Args[1:]

	meta := new(command.Meta)
	meta.SetupUi(args)
	// The agent itself never writes colour.
	agentUI := &cli.BasicUi{Reader: os.Stdin, Writer: os.Stdout, ErrorWriter: os.Stderr}

	c := &cli.CLI{
		Name:                       "nomad",
		Version:                    version.GetVersion().FullVersionNumber(true),
		Args:                       args,
		Commands:                   command.Commands(meta, agentUI),
		HiddenCommands:             hidden,
		Autocomplete:               true,
		AutocompleteNoDefaultFlags: true,
		HelpFunc:                   cli.BasicHelpFunc("nomad"),
		HelpWriter:                 os.Stdout,
	}

	code, err := c.Run()
	if err != nil {
		fmt.Fprintf(os.Stderr, "Error executing CLI: %s\n", err)
		os.Exit(1)
	}
	os.Exit(code)
}

"""tomq.sensors: the device SDK (`device.Device`, `outbox.Outbox`), simulated sensors (`simulators`)
and `tomq sensor` (`cli`). See sensors/README.md. Kept empty of imports so that importing the
package does not pull in paho."""
